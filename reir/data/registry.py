"""What REIR knows about each dataset: normalisation, reported recalls, published split sizes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    mean: tuple[float, float, float] | None
    std: tuple[float, float, float] | None
    recalls: tuple[int, ...]
    # Published image / class counts per split, to catch partial downloads.
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    croppable: bool = False
    # The meta classes per branch of the original's parameter table and runs (None: not in it).
    original_meta_classes: int | None = None


BENCHMARKS = {
    "car": DatasetInfo("car", (0.4853, 0.4965, 0.4295), (0.2237, 0.2193, 0.2568), (1, 2, 4, 8),
                       {"train": (8054, 98), "test": (8131, 98)}, croppable=True, original_meta_classes=12),
    "cub": DatasetInfo("cub", (0.4707, 0.4601, 0.4549), (0.2767, 0.2760, 0.2850), (1, 2, 4, 8),
                       {"train": (5864, 100), "test": (5924, 100)}, croppable=True, original_meta_classes=12),
    "sop": DatasetInfo("sop", (0.5807, 0.5396, 0.5044), (0.2901, 0.2974, 0.3095), (1, 10, 100, 1000),
                       {"train": (59551, 11318), "test": (60502, 11316)}, original_meta_classes=512),
    "isc": DatasetInfo("isc", (0.8324, 0.8109, 0.8041), (0.2206, 0.2378, 0.2444), (1, 10, 20, 30, 40, 50),
                       {"train": (25882, 3997), "query": (14218, 3985), "gallery": (12612, 3985)},
                       original_meta_classes=192),
}
# Embedded and user datasets: mean/std are computed from the training split when prepared.
OTHERS = {
    "digits": DatasetInfo("digits", None, None, (1, 2, 4, 8)),
    "glyphs": DatasetInfo("glyphs", None, None, (1, 2, 4, 8)),
    "fonts": DatasetInfo("fonts", None, None, (1, 2, 4, 8)),
    "typefaces": DatasetInfo("typefaces", None, None, (1, 2, 4, 8)),
    "custom": DatasetInfo("custom", None, None, (1, 2, 4, 8), croppable=True),
}
DATA_NAMES = tuple(BENCHMARKS) + tuple(OTHERS)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dataset_info(name: str) -> DatasetInfo:
    return BENCHMARKS.get(name) or OTHERS[name]
