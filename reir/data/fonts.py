"""The embedded unseen-typeface dataset: test characters *and* test fonts never seen in training.

Built from the fonts matplotlib ships (so it builds offline wherever REIR installs): the twelve
DejaVu fonts (Sans, Serif, Sans Mono; regular, bold, oblique/italic, bold oblique/italic) draw the
training images, the four STIX fonts (a Times-like family of another foundry) draw the test
images. A class is a character that all sixteen fonts draw; half the characters train, the other
half test (a seeded permutation), so a training class has 12 images and a test class 4. Where
the glyphs set asks "the same character in another font I trained on?", this one asks it of a
typeface family the network never saw.
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
from PIL import ImageFont

from reir.data.glyphs import (DEJAVU, DRAWN_CATEGORIES, FONT_SIZE, IMAGE_SIZE, SPLIT_SEED, STIX, font_folder,
                              render, split_classes, write_images)
from reir.data.splits import SplitList, load_split_list, save_split_list, split_list_path
from reir.errors import ReirError
from reir.fileio import ensure_dir

DATA_NAME = "fonts"
TRAIN_FONTS = tuple(DEJAVU)
TEST_FONTS = tuple(STIX)


def shared_characters(folder: Path, fonts: tuple[str, ...]) -> list[int]:
    """Visible characters every one of ``fonts`` maps, in code-point order."""
    from fontTools.ttLib import TTFont

    missing = [name for name in fonts if not (folder / name).is_file()]
    if missing:
        raise ReirError(f"{len(missing)} of matplotlib's fonts ({missing[0]}, ...) not found in {folder}; "
                        "reinstall matplotlib (pip install --force-reinstall matplotlib)")
    maps = [set(TTFont(folder / name, lazy=True).getBestCmap()) for name in fonts]
    return [p for p in sorted(set.intersection(*maps)) if unicodedata.category(chr(p))[0] in DRAWN_CATEGORIES]


def render_fonts(folder: Path, points: list[int], fonts: tuple[str, ...]) -> dict[int, list[np.ndarray]]:
    """Each character in every font of ``fonts``; characters some font draws blank are left out, and
    homoglyphs (drawn alike by every font, as Latin A and Greek Alpha) are kept once."""
    faces = [ImageFont.truetype(str(folder / name), FONT_SIZE) for name in fonts]
    images, seen = {}, set()
    for point in points:
        drawn = [render(face, point) for face in faces]
        if any(pixels is None for pixels in drawn):
            continue
        signature = b"".join(pixels.tobytes() for pixels in drawn)
        if signature not in seen:
            seen.add(signature)
            images[point] = drawn
    return images


def prepare_fonts(data_path: str | Path, limit: int | None = None) -> SplitList:
    """Write ``<data_path>/fonts/`` once (PNG files + split list); later calls read the split list.

    ``limit`` keeps only the first characters (a small set for tests).
    """
    target = split_list_path(data_path, DATA_NAME, "uncropped")
    if target.is_file():
        return load_split_list(target)
    folder = font_folder()
    every = render_fonts(folder, shared_characters(folder, TRAIN_FONTS + TEST_FONTS)[:limit], TRAIN_FONTS + TEST_FONTS)
    train, test = split_classes(sorted(every))
    cut = len(TRAIN_FONTS)
    rendered = {"train": {p: dict(zip(TRAIN_FONTS, every[p][:cut])) for p in train},
                "test": {p: dict(zip(TEST_FONTS, every[p][cut:])) for p in test}}
    splits = write_images(ensure_dir(Path(data_path) / DATA_NAME), rendered, "font")
    grey = np.stack([p for drawn in rendered["train"].values() for p in drawn.values()]).astype(np.float64) / 255.0
    mean, std = [float(grey.mean())] * 3, [float(grey.std())] * 3
    info = {"image_size": IMAGE_SIZE, "train_fonts": list(TRAIN_FONTS), "test_fonts": list(TEST_FONTS),
            "split_seed": SPLIT_SEED, "characters": sum(map(len, rendered.values())), "limit": limit}
    save_split_list(target, DATA_NAME, "uncropped", mean, std, splits, info)
    return load_split_list(target)
