"""The embedded many-class dataset: characters rendered in the fonts that ship with matplotlib.

A class is one character, an image is that character in one font, so retrieval has to match
the same character across typefaces (DejaVu Sans/Serif/Mono in four styles, STIX in four,
Computer Modern for letters and digits). About a thousand classes on each side, drawn
from the fonts' own character maps: REIR's regime of many training classes, with no download.

Everything is deterministic: a fixed font list, characters kept in code-point order, and the
train/test classes split by a seeded permutation, so two machines with the same matplotlib
write the same images.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from reir.data.splits import Split, SplitList, load_split_list, save_split_list, split_list_path
from reir.errors import ReirError
from reir.fileio import atomic_write, ensure_dir

IMAGE_SIZE = 32
# The glyph is drawn at this em size, then shrunk only if its ink would not fit the image.
FONT_SIZE = 26
MARGIN = 1
# A character is a class when at least this many fonts draw it (so each class has that many images).
MIN_FONTS = 12
SPLIT_SEED = 0
# Unicode categories that draw something on their own: letters, numbers, punctuation, symbols.
DRAWN_CATEGORIES = ("L", "N", "P", "S")
DEJAVU = [f"DejaVu{family}{style}.ttf" for family in ("Sans", "Serif", "SansMono")
          for style in ("", "-Bold", "-Oblique" if family != "Serif" else "-Italic",
                        "-BoldOblique" if family != "Serif" else "-BoldItalic")]
STIX = ["STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf"]
# Computer Modern's character maps follow TeX's encoding, which agrees with Unicode only on letters and digits.
COMPUTER_MODERN = ["cmr10.ttf", "cmb10.ttf", "cmti10.ttf", "cmss10.ttf", "cmtt10.ttf"]
FONTS = DEJAVU + STIX + COMPUTER_MODERN
ALPHANUMERIC = frozenset(map(ord, "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"))


def font_folder() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_characters(folder: Path) -> dict[str, set[int]]:
    """Code points each font draws, from its character map."""
    from fontTools.ttLib import TTFont

    missing = [name for name in FONTS if not (folder / name).is_file()]
    if missing:
        raise ReirError(f"{len(missing)} of matplotlib's fonts ({missing[0]}, ...) not found in {folder}; "
                        "reinstall matplotlib "
                        "(pip install --force-reinstall matplotlib)")
    drawn = {}
    for name in FONTS:
        cmap = set(TTFont(folder / name, lazy=True).getBestCmap())
        drawn[name] = cmap & ALPHANUMERIC if name in COMPUTER_MODERN else cmap
    return drawn


def candidate_characters(drawn: dict[str, set[int]], min_fonts: int = MIN_FONTS) -> list[int]:
    """Visible characters drawn by at least ``min_fonts`` fonts, in code-point order."""
    counts: dict[int, int] = {}
    for points in drawn.values():
        for point in points:
            counts[point] = counts.get(point, 0) + 1
    return [p for p in sorted(counts) if counts[p] >= min_fonts
            and unicodedata.category(chr(p))[0] in DRAWN_CATEGORIES]


def render(font: ImageFont.FreeTypeFont, point: int) -> np.ndarray | None:
    """The character's ink centred in an ``IMAGE_SIZE`` square (white on black), or None if blank."""
    canvas = Image.new("L", (4 * FONT_SIZE, 4 * FONT_SIZE))
    ImageDraw.Draw(canvas).text((2 * FONT_SIZE, 2 * FONT_SIZE), chr(point), fill=255, font=font, anchor="mm")
    box = canvas.getbbox()
    if box is None:
        return None
    ink = canvas.crop(box)
    room = IMAGE_SIZE - 2 * MARGIN
    if max(ink.size) > room:
        scale = room / max(ink.size)
        ink = ink.resize((max(1, round(ink.width * scale)), max(1, round(ink.height * scale))),
                         Image.Resampling.BILINEAR)
    image = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE))
    image.paste(ink, ((IMAGE_SIZE - ink.width) // 2, (IMAGE_SIZE - ink.height) // 2))
    pixels = np.asarray(image)
    return pixels if pixels.max() > 0 else None


def render_all(folder: Path, min_fonts: int = MIN_FONTS, limit: int | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Renderings per character and font; homoglyphs (identical in every font both draw) kept once.

    ``limit`` stops after that many characters (small sets for tests).
    """
    drawn = font_characters(folder)
    fonts = {name: ImageFont.truetype(str(folder / name), FONT_SIZE) for name in FONTS}
    images: dict[int, dict[str, np.ndarray]] = {}
    seen: dict[bytes, int] = {}
    for point in candidate_characters(drawn, min_fonts):
        if limit is not None and len(images) >= limit:
            break
        rendered = {}
        for name in FONTS:
            if point in drawn[name]:
                pixels = render(fonts[name], point)
                if pixels is not None:
                    rendered[name] = pixels
        if len(rendered) < min_fonts:
            continue
        signature = b"".join(rendered[n].tobytes() if n in rendered else b"-" for n in FONTS)
        if signature in seen:  # e.g. Latin A, Greek Alpha and Cyrillic A drawn alike by every font
            continue
        seen[signature] = point
        images[point] = rendered
    return images


def class_name(point: int) -> str:
    return f"U+{point:04X}"


def split_classes(points: list[int], seed: int = SPLIT_SEED) -> tuple[list[int], list[int]]:
    """Half the characters train, the other half test, by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(points))
    half = len(points) // 2
    return sorted(points[i] for i in order[:half]), sorted(points[i] for i in order[half:])


def write_images(root: Path, rendered: dict[str, dict[int, dict[str, np.ndarray]]], what: str) -> dict[str, Split]:
    """``<root>/images/<class>/<font>.png`` for each split's characters (``rendered[split][point][font]``),
    and the splits listing them.

    Images go to a scratch folder renamed into place, and the caller writes the split list after:
    a crash leaves no list, so the next call starts again.
    """
    try:
        scratch = Path(tempfile.mkdtemp(prefix=".images.", dir=root))
    except OSError as exc:
        raise ReirError(f"cannot write in {root}: {exc.strerror}; choose a writable `data_path`") from None
    splits = {split: Split([], []) for split in rendered}
    try:
        for split, characters in rendered.items():
            for point, drawn in characters.items():
                ensure_dir(scratch / class_name(point))
                for font, pixels in drawn.items():
                    relative = f"{class_name(point)}/{Path(font).stem}.png"
                    Image.fromarray(pixels).save(scratch / relative, format="PNG")
                    splits[split].paths.append(f"images/{relative}")
                    splits[split].labels.append(class_name(point))
        final = root / "images"
        if final.exists():
            shutil.rmtree(final)
        os.replace(scratch, final)
    except OSError as exc:
        raise ReirError(f"cannot write the {what} images under {root}: {exc.strerror}; "
                        "free space or choose another `data_path`") from None
    finally:
        if scratch.exists():
            shutil.rmtree(scratch, ignore_errors=True)
    return splits


def prepare_glyphs(data_path: str | Path, limit: int | None = None) -> SplitList:
    """Write ``<data_path>/glyphs/`` once (PNG files + split list); later calls read the split list.

    ``limit`` keeps only the first characters (a small set for tests).
    """
    target = split_list_path(data_path, "glyphs", "uncropped")
    if target.is_file():
        return load_split_list(target)
    folder = font_folder()
    images = render_all(folder, limit=limit)
    train, test = split_classes(sorted(images))
    root = ensure_dir(Path(data_path) / "glyphs")
    splits = write_images(root, {"train": {p: images[p] for p in train}, "test": {p: images[p] for p in test}},
                          "glyph")
    train_pixels = [pixels for point in train for pixels in images[point].values()]
    grey = np.stack(train_pixels).astype(np.float64) / 255.0
    mean, std = [float(grey.mean())] * 3, [float(grey.std())] * 3
    info = {"image_size": IMAGE_SIZE, "fonts": FONTS, "min_fonts": MIN_FONTS, "split_seed": SPLIT_SEED,
            "characters": len(images), "limit": limit}
    save_split_list(target, "glyphs", "uncropped", mean, std, splits, info)
    return load_split_list(target)


def write_subset_csv(split_list: SplitList, target: str | Path, train_classes: int, test_classes: int,
                     seed: int | None = SPLIT_SEED) -> Path:
    """A CSV (``path,label,split``, for ``data_name='custom'``) over some classes of each split: a
    smaller run on the same images, for a CPU's time budget.

    ``seed``: a seeded random choice of classes; ``None``: the classes with the lowest code points,
    a dense block of look-alikes (Latin letters with diacritics) where raw pixels do poorly.
    """
    rng = np.random.default_rng(seed)
    rows = io.StringIO()
    writer = csv.writer(rows, lineterminator="\n")
    writer.writerow(["path", "label", "split"])
    for split, count in (("train", train_classes), ("test", test_classes)):
        classes = sorted(split_list.splits[split].classes, key=lambda name: int(name[2:], 16))
        if seed is None:
            chosen = set(classes[:count])
        else:
            chosen = set(rng.choice(classes, size=min(count, len(classes)), replace=False).tolist())
        # Absolute paths: the CSV lives elsewhere than the data, and custom CSV paths are relative to the CSV.
        writer.writerows([os.path.abspath(path), label, split] for path, label in
                         zip(split_list.absolute(split), split_list.splits[split].labels) if label in chosen)
    return atomic_write(target, rows.getvalue())
