"""The embedded unseen-typeface dataset: test characters *and* test fonts never seen in training.

Built from the fonts matplotlib ships, so it builds offline wherever REIR installs. The twelve
DejaVu fonts (Sans, Serif, Sans Mono; regular, bold, oblique/italic, bold oblique/italic) draw the
training characters: every visible character all twelve map, except the 62 letters and digits and
any character they draw exactly as a letter or digit (Greek capital Alpha, Cyrillic a, ...). The
test classes are the 62 letters and digits, drawn only by the nine fonts of two other families:
STIX General (a Times-like serif in four styles) and Computer Modern (roman, bold, italic, sans,
typewriter). Where the glyphs set asks "the same character in another font I trained on?", this
one asks it of unseen characters in typefaces the network never saw, with look-alikes among them
(l, I, 1; O, 0, o).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
from PIL import ImageFont

from reir.data.glyphs import (
    ALPHANUMERIC,
    COMPUTER_MODERN,
    DEJAVU,
    DRAWN_CATEGORIES,
    FONT_SIZE,
    IMAGE_SIZE,
    STIX,
    font_folder,
    render,
    write_images,
)
from reir.data.splits import SplitList, load_split_list, save_split_list, split_list_path
from reir.errors import ReirError
from reir.fileio import ensure_dir

DATA_NAME = "fonts"
TRAIN_FONTS = tuple(DEJAVU)
TEST_FONTS = tuple(STIX + COMPUTER_MODERN)
TEST_CHARACTERS = tuple(sorted(ALPHANUMERIC))


def shared_characters(folder: Path, fonts: tuple[str, ...]) -> list[int]:
    """Visible characters every one of ``fonts`` maps, in code-point order."""
    from fontTools.ttLib import TTFont

    missing = [name for name in fonts if not (folder / name).is_file()]
    if missing:
        raise ReirError(f"{len(missing)} of matplotlib's fonts ({missing[0]}, ...) not found in {folder}; "
                        "reinstall matplotlib (pip install --force-reinstall matplotlib)")
    maps = [set(TTFont(folder / name, lazy=True).getBestCmap()) for name in fonts]
    return [p for p in sorted(set.intersection(*maps)) if unicodedata.category(chr(p))[0] in DRAWN_CATEGORIES]


def render_fonts(folder: Path, points, fonts: tuple[str, ...], seen: set[bytes]) -> dict[int, dict[str, np.ndarray]]:
    """Each character in every font of ``fonts``. Left out: characters some font draws blank, and
    characters drawn exactly as one whose renderings are in ``seen`` (which collects those kept)."""
    faces = [ImageFont.truetype(str(folder / name), FONT_SIZE) for name in fonts]
    images = {}
    for point in points:
        drawn = [pixels for pixels in (render(face, point) for face in faces) if pixels is not None]
        if len(drawn) < len(faces):
            continue
        signature = b"".join(pixels.tobytes() for pixels in drawn)
        if signature not in seen:
            seen.add(signature)
            images[point] = dict(zip(fonts, drawn))
    return images


def prepare_fonts(data_path: str | Path, limit: int | None = None) -> SplitList:
    """Write ``<data_path>/fonts/`` once (PNG files + split list); later calls read the split list.

    ``limit`` keeps only the first characters of each side (a small set for tests).
    """
    target = split_list_path(data_path, DATA_NAME, "uncropped")
    if target.is_file():
        return load_split_list(target)
    folder = font_folder()
    shared_characters(folder, TEST_FONTS)  # names a missing font
    test = render_fonts(folder, TEST_CHARACTERS[:limit], TEST_FONTS, set())
    # The letters and digits as the training fonts draw them: training characters drawn alike are left out.
    seen: set[bytes] = set()
    render_fonts(folder, TEST_CHARACTERS, TRAIN_FONTS, seen)
    candidates = [p for p in shared_characters(folder, TRAIN_FONTS) if p not in ALPHANUMERIC]
    train = render_fonts(folder, candidates[:limit], TRAIN_FONTS, seen)
    rendered = {"train": train, "test": test}
    splits = write_images(ensure_dir(Path(data_path) / DATA_NAME), rendered, "font")
    grey = np.stack([p for drawn in train.values() for p in drawn.values()]).astype(np.float64) / 255.0
    mean, std = [float(grey.mean())] * 3, [float(grey.std())] * 3
    info = {"image_size": IMAGE_SIZE, "train_fonts": list(TRAIN_FONTS), "test_fonts": list(TEST_FONTS),
            "train_characters": len(train), "test_characters": len(test), "limit": limit}
    save_split_list(target, DATA_NAME, "uncropped", mean, std, splits, info)
    return load_split_list(target)
