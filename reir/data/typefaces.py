"""The many-class unseen-typeface dataset: hundreds of test characters, drawn only in typefaces never seen
in training.

The ``fonts`` set (reir/data/fonts.py) splits by typeface too, but its test side is the 62 letters
and digits, all that Computer Modern maps. Here the test typefaces are Debian's Liberation fonts
(``fonts-liberation``: Sans, Sans Narrow, Serif, Mono; regular, bold, italic, bold italic), which
share some 650 visible characters with the twelve DejaVu fonts inside matplotlib: Latin with its
diacritics, Greek, Cyrillic, punctuation, currency and other symbols. A class is a character both
font sets map in every font. Left out: characters some font draws blank, and characters drawn pixel
for pixel as an earlier one by either set (Latin A, Greek Alpha, Cyrillic A), so no test class is a
training class under another code point. The characters left are split in half by a seeded
permutation; a training class is drawn by the twelve DejaVu fonts only, a test class by the sixteen
Liberation fonts only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import ImageFont

from reir.data.fonts import shared_characters
from reir.data.glyphs import DEJAVU, FONT_SIZE, IMAGE_SIZE, SPLIT_SEED, font_folder, render, split_classes, write_images
from reir.data.splits import SplitList, load_split_list, save_split_list, split_list_path
from reir.errors import ReirError
from reir.fileio import ensure_dir

DATA_NAME = "typefaces"


@dataclass(frozen=True)
class FontSet:
    """Fonts of one side of the split: where they are, their file names, and how to install them."""

    folder: Path
    names: tuple[str, ...]
    install: str

    def require(self) -> None:
        missing = [name for name in self.names if not (self.folder / name).is_file()]
        if missing:
            raise ReirError(f"{len(missing)} of the {len(self.names)} fonts ({missing[0]}, ...) not found in "
                            f"{self.folder}; install them with `{self.install}`")


LIBERATION = FontSet(Path("/usr/share/fonts/truetype/liberation"),
                     tuple(f"Liberation{family}-{style}.ttf" for family in ("Sans", "SansNarrow", "Serif", "Mono")
                           for style in ("Regular", "Bold", "Italic", "BoldItalic")),
                     "apt-get install -y fonts-liberation")


def matplotlib_dejavu() -> FontSet:
    """The training side: the twelve DejaVu fonts matplotlib ships (its folder is known once it is imported)."""
    return FontSet(font_folder(), tuple(DEJAVU), "pip install --force-reinstall matplotlib")


def candidate_characters(train: FontSet, test: FontSet) -> list[int]:
    """Visible characters every font of both sides maps, in code-point order: the classes before
    blank and look-alike characters are left out."""
    train.require()
    test.require()
    return sorted(set(shared_characters(train.folder, train.names)) & set(shared_characters(test.folder, test.names)))


def distinct_characters(points, train: FontSet, test: FontSet) -> dict[int, dict[str, dict[str, np.ndarray]]]:
    """Each character's renderings on both sides (``[point]["train" | "test"][font]``), for the
    characters no font draws blank and neither side draws exactly as an earlier character kept."""
    sides = {"train": train, "test": test}
    faces = {side: [ImageFont.truetype(str(fonts.folder / name), FONT_SIZE) for name in fonts.names]
             for side, fonts in sides.items()}
    seen: dict[str, set[bytes]] = {side: set() for side in sides}
    kept = {}
    for point in points:
        rendered = {side: [render(face, point) for face in faces[side]] for side in sides}
        drawn = {side: [pixels for pixels in images if pixels is not None] for side, images in rendered.items()}
        if any(len(drawn[side]) < len(rendered[side]) for side in sides):  # some font draws it blank
            continue
        signatures = {side: b"".join(pixels.tobytes() for pixels in images) for side, images in drawn.items()}
        if any(signatures[side] in seen[side] for side in sides):
            continue
        for side in sides:
            seen[side].add(signatures[side])
        kept[point] = {side: dict(zip(sides[side].names, drawn[side])) for side in sides}
    return kept


def prepare_typefaces(data_path: str | Path, limit: int | None = None, train: FontSet | None = None,
                      test: FontSet | None = None) -> SplitList:
    """Write ``<data_path>/typefaces/`` once (PNG files + split list); later calls read the split list.

    ``train`` / ``test``: the font sets of each side (default: matplotlib's DejaVu, Debian's Liberation).
    ``limit`` keeps only the first candidate characters (a small set for tests).
    """
    target = split_list_path(data_path, DATA_NAME, "uncropped")
    if target.is_file():
        return load_split_list(target)
    train = train or matplotlib_dejavu()
    test = test or LIBERATION
    images = distinct_characters(candidate_characters(train, test)[:limit], train, test)
    train_points, test_points = split_classes(sorted(images), SPLIT_SEED)
    rendered = {"train": {p: images[p]["train"] for p in train_points},
                "test": {p: images[p]["test"] for p in test_points}}
    splits = write_images(ensure_dir(Path(data_path) / DATA_NAME), rendered, "typeface")
    grey = np.stack([p for drawn in rendered["train"].values() for p in drawn.values()]).astype(np.float64) / 255.0
    mean, std = [float(grey.mean())] * 3, [float(grey.std())] * 3
    info = {"image_size": IMAGE_SIZE, "train_fonts": list(train.names), "test_fonts": list(test.names),
            "split_seed": SPLIT_SEED, "train_characters": len(train_points), "test_characters": len(test_points),
            "limit": limit}
    save_split_list(target, DATA_NAME, "uncropped", mean, std, splits, info)
    return load_split_list(target)
