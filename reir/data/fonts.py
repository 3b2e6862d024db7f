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

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageFont

from reir.data.glyphs import (DEJAVU, DRAWN_CATEGORIES, FONT_SIZE, IMAGE_SIZE, SPLIT_SEED, STIX, class_name,
                              font_folder, render, split_classes)
from reir.data.splits import Split, SplitList, load_split_list, save_split_list, split_list_path
from reir.errors import ReirError
from reir.fileio import ensure_dir

DATA_NAME = "fonts"
TRAIN_FONTS = tuple(DEJAVU)
TEST_FONTS = tuple(STIX)


def shared_characters(folder: Path, fonts: tuple[str, ...]) -> list[int]:
    """Visible characters every one of ``fonts`` maps, in code-point order."""
    from fontTools.ttLib import TTFont
    import unicodedata

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
    rendered = {"train": {p: every[p][:cut] for p in train}, "test": {p: every[p][cut:] for p in test}}
    fonts = {"train": TRAIN_FONTS, "test": TEST_FONTS}
    root = ensure_dir(Path(data_path) / DATA_NAME)
    splits = {split: Split([], []) for split in rendered}
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".images.", dir=root))
    except OSError as exc:
        raise ReirError(f"cannot write in {root}: {exc.strerror}; choose a writable --data_path") from None
    try:
        for split, images in rendered.items():
            for point, drawn in images.items():
                ensure_dir(scratch / class_name(point))
                for font, pixels in zip(fonts[split], drawn):
                    relative = f"{class_name(point)}/{Path(font).stem}.png"
                    Image.fromarray(pixels).save(scratch / relative, format="PNG")
                    splits[split].paths.append(f"images/{relative}")
                    splits[split].labels.append(class_name(point))
        final = root / "images"
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    except OSError as exc:
        raise ReirError(f"cannot write the font images under {root}: {exc.strerror}; "
                        "free space or choose another --data_path") from None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    grey = np.stack([p for drawn in rendered["train"].values() for p in drawn]).astype(np.float64) / 255.0
    mean, std = [float(grey.mean())] * 3, [float(grey.std())] * 3
    info = {"image_size": IMAGE_SIZE, "train_fonts": list(TRAIN_FONTS), "test_fonts": list(TEST_FONTS),
            "split_seed": SPLIT_SEED, "characters": sum(map(len, rendered.values())), "limit": limit}
    save_split_list(target, DATA_NAME, "uncropped", mean, std, splits, info)
    return load_split_list(target)
