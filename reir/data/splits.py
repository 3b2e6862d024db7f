"""The prepared split list: the one format every dataset is turned into before training.

``<data_path>/<data_name>/splits_<crop_type>.json``::

    {"format": "reir-splits/1", "data_name": "car", "crop_type": "uncropped",
     "mean": [r, g, b], "std": [r, g, b],
     "splits": {"train": {"paths": [...], "labels": [...]}, "test": {...}}}

Paths are relative to the JSON file's folder; labels are class names (strings).
Either ``test`` (retrieval within the test set) or ``query`` + ``gallery`` is present.
An optional ``info`` object records how the list was prepared (e.g. ``image_size`` of a resize cache).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from reir.errors import ReirError
from reir.fileio import read_json, write_json

FORMAT = "reir-splits/1"
SPLIT_NAMES = ("train", "test", "query", "gallery")


@dataclass
class Split:
    paths: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels), key=_natural_key)


@dataclass
class SplitList:
    data_name: str
    crop_type: str
    mean: list[float]
    std: list[float]
    splits: dict[str, Split]
    root: Path
    info: dict = field(default_factory=dict)

    @property
    def query_gallery(self) -> bool:
        return "query" in self.splits and "gallery" in self.splits

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """Splits embedded for evaluation: query -> gallery, else test against itself."""
        return ("query", "gallery") if self.query_gallery else ("test",)

    def absolute(self, split: str) -> list[str]:
        return [str(self.root / p) for p in self.splits[split].paths]


def split_list_path(data_path: str | Path, data_name: str, crop_type: str) -> Path:
    return Path(data_path) / data_name / f"splits_{crop_type}.json"


def save_split_list(path: str | Path, data_name: str, crop_type: str, mean, std,
                    splits: dict[str, Split], info: dict | None = None) -> Path:
    return write_json(path, {
        "format": FORMAT, "data_name": data_name, "crop_type": crop_type,
        "mean": [float(v) for v in mean], "std": [float(v) for v in std], "info": info or {},
        "splits": {name: {"paths": s.paths, "labels": [str(v) for v in s.labels]} for name, s in splits.items()},
    })


def load_split_list(path: str | Path) -> SplitList:
    path = Path(path)
    data = read_json(path, "split list")
    try:
        if data.get("format") != FORMAT:
            raise KeyError("format")
        splits = {name: Split(list(s["paths"]), [str(v) for v in s["labels"]])
                  for name, s in data["splits"].items()}
        result = SplitList(data["data_name"], data["crop_type"], list(data["mean"]), list(data["std"]),
                           splits, path.parent, dict(data.get("info") or {}))
    except (KeyError, TypeError, AttributeError):
        raise ReirError(f"split list {path} is malformed; prepare the dataset again") from None
    for name, split in splits.items():
        if name not in SPLIT_NAMES or len(split.paths) != len(split.labels):
            raise ReirError(f"split list {path} has a bad split {name!r}; prepare the dataset again")
    if "train" not in splits or not (("test" in splits) or result.query_gallery):
        raise ReirError(f"split list {path} needs a train split and a test (or query + gallery) split")
    return result


def _natural_key(label: str):
    """Class names sort numerically where they are ASCII numbers ("2" before "10"); "²" or "٣" sort as text."""
    return (0, int(label), "") if label.isascii() and label.isdigit() else (1, 0, label)
