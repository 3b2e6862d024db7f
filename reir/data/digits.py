"""The embedded dataset: scikit-learn's 1,797 handwritten digits, written once as PNG files.

Classes 0-4 train, 5-9 test, so retrieval is on unseen classes as in the benchmarks.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from PIL import Image

from reir.data.splits import Split, SplitList, load_split_list, save_split_list, split_list_path
from reir.fileio import atomic_write_with, ensure_dir


def prepare_digits(data_path: str | Path) -> SplitList:
    target = split_list_path(data_path, "digits", "uncropped")
    if target.is_file():
        return load_split_list(target)
    from sklearn.datasets import load_digits

    digits = load_digits()
    root = ensure_dir(Path(data_path) / "digits")
    splits = {"train": Split([], []), "test": Split([], [])}
    train_pixels = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        grey = np.clip(pixels * (255.0 / 16.0), 0, 255).astype(np.uint8)
        rgb = np.repeat(grey[:, :, None], 3, axis=2)
        relative = f"images/{label}/{index:04d}.png"
        atomic_write_with(root / relative, functools.partial(Image.fromarray(rgb).save, format="PNG"))
        split = "train" if label < 5 else "test"
        splits[split].paths.append(relative)
        splits[split].labels.append(str(label))
        if split == "train":
            train_pixels.append(rgb.reshape(-1, 3) / 255.0)
    stacked = np.concatenate(train_pixels)
    save_split_list(target, "digits", "uncropped", stacked.mean(0), stacked.std(0), splits)
    return load_split_list(target)
