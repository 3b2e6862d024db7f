"""Small databases written by hand, whose rankings can be worked out on paper."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image

from reir.retrieval.database import SUFFIX, Database


def angles_to_features(degrees: list[float]) -> torch.Tensor:
    """One branch, two meta classes: the cosine of two images is the cosine of their angle difference."""
    radians = torch.tensor([math.radians(d) for d in degrees], dtype=torch.float64)
    return torch.stack([radians.cos(), radians.sin()], dim=1)[:, None, :].float()


def write_images(folder: Path, names: list[str]) -> list[str]:
    """Tiny solid-colour PNGs standing in for dataset images."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, name in enumerate(names):
        path = folder / name
        Image.new("RGB", (10, 8), ((37 * i) % 256, (91 * i) % 256, 200)).save(path)
        paths.append(str(path))
    return paths


def make_database(root: Path, name: str, splits: dict[str, tuple[list[float] | torch.Tensor, list[str]]],
                  info: dict | None = None, image_folder: Path | None = None) -> Path:
    """``splits``: split -> (angles in degrees or a feature tensor, labels). Images are shared per split."""
    images = image_folder or root / "images"
    features, split_info = {}, {}
    for split, (values, labels) in splits.items():
        features[split] = values if isinstance(values, torch.Tensor) else angles_to_features(values)
        paths = write_images(images / split, [f"{split}_{i:03d}.png" for i in range(len(labels))])
        split_info[split] = {"paths": paths, "labels": list(labels)}
    info = {"data_name": "toy", "crop_type": "uncropped", **(info or {})}
    return Database(features, split_info, {"save_name": name}, info).save(root / "results" / f"{name}{SUFFIX}")


# Worked out by hand for K = 2, the query excluded (see tests/test_ablation.py).
TEST_LABELS = ["A", "A", "A", "B", "B", "C"]
BETTER_ANGLES = [0, 5, 10, 120, 125, 250]  # correct among top 2: 2, 2, 2, 1, 1, 0
WORSE_ANGLES = [0, 90, 170, 40, 225, 300]  # correct among top 2: 0, 1, 1, 0, 0, 0
