"""Pictures of retrieval results: bordered tiles laid out in a grid.

A green border means the result shares the query's class, red that it does not,
grey that the query's class is unknown; the query itself gets a blue border.
Everything is drawn with PIL so the colours in a PNG are exactly these values.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from reir.data.images import read_image
from reir.fileio import FORMAT_CHUNK, atomic_write_with

GREEN = (0, 170, 0)
RED = (220, 0, 0)
GREY = (150, 150, 150)
BLUE = (0, 90, 220)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)

TILE = 128  # image side inside a grid cell
BORDER = 6
CAPTION_LINES = 3  # rank and score, then the label wrapped to two lines
LINE = 13
CAPTION = CAPTION_LINES * LINE + 4  # text strip under each cell
TITLE = 22  # optional strip above the grid
GAP = 4
FILE_SIZE = 224  # side of the per-image files, as in the original
SEARCH_FORMAT = "reir-search/1"  # recorded in a search's grid.png and results.json
# The labels of the glyph datasets: a code point, told apart from a look-alike (Latin A, Greek Alpha,
# Cyrillic A) only by the character itself, which captions add.
CODE_POINT = re.compile(r"U\+([0-9A-F]{4,6})")


def shown_label(label: str | None) -> str | None:
    """A label as captions show it: a code point with its character (``U+0391`` then the Greek capital alpha),
    anything else as it is."""
    found = CODE_POINT.fullmatch(label or "")
    if found:
        point = int(found.group(1), 16)
        if point <= 0x10FFFF and not 0xD800 <= point <= 0xDFFF:
            return f"{label} {chr(point)}"
    return label


@lru_cache(maxsize=1)
def caption_font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (shipped with matplotlib, as the glyphs are): it draws Latin, Greek and Cyrillic, which
    PIL's default font does not."""
    from reir.data.glyphs import font_folder

    try:
        return ImageFont.truetype(str(font_folder() / "DejaVuSans.ttf"), 11)
    except OSError:
        return ImageFont.load_default()


def caption_lines(text: str, font, width: int = TILE, lines: int = CAPTION_LINES) -> list[str]:
    """``text`` (lines split at newlines) broken into at most ``lines`` lines no wider than ``width``
    pixels, at spaces where possible; text beyond the last line ends in an ellipsis."""
    out: list[str] = []
    for paragraph in text.split("\n"):
        current = ""
        for character in paragraph:
            if current and font.getlength(current + character) > width:
                cut = current.rfind(" ")
                head, current = (current[:cut], current[cut + 1:]) if cut > 0 else (current, "")
                out.append(head)
            current += character
        out.append(current)
    if len(out) > lines:
        last = out[lines - 1]
        while last and font.getlength(last + "…") > width:
            last = last[:-1]
        out = [*out[:lines - 1], last + "…"]
    return out


@dataclass
class Tile:
    path: str
    caption: str
    colour: tuple[int, int, int]


def status_colour(correct: bool | None) -> tuple[int, int, int]:
    return GREY if correct is None else GREEN if correct else RED


def bordered(image: Image.Image, colour: tuple[int, int, int], size: int = TILE, border: int = BORDER) -> Image.Image:
    """``image`` resized to ``size`` squared (what the model sees) inside a ``border``-pixel frame."""
    framed = Image.new("RGB", (size + 2 * border, size + 2 * border), colour)
    framed.paste(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR), (border, border))
    return framed


def cell_size() -> tuple[int, int]:
    return TILE + 2 * BORDER, TILE + 2 * BORDER + CAPTION


def grid_size(rows: int, columns: int, title: bool = False) -> tuple[int, int]:
    width, height = cell_size()
    return (GAP + columns * (width + GAP), (TITLE if title else 0) + GAP + rows * (height + GAP))


def cell_origin(row: int, column: int, title: bool = False) -> tuple[int, int]:
    """Top-left pixel of a cell's border."""
    width, height = cell_size()
    return GAP + column * (width + GAP), (TITLE if title else 0) + GAP + row * (height + GAP)


def grid(rows: list[list[Tile | None]], title: str | None = None) -> Image.Image:
    """Cells left to right, top to bottom; ``None`` leaves a cell blank."""
    columns = max((len(r) for r in rows), default=0)
    canvas = Image.new("RGB", grid_size(len(rows), columns, title is not None), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = caption_font()
    if title is not None:
        draw.text((GAP, GAP), title, fill=TEXT, font=font)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            if tile is None:
                continue
            x, y = cell_origin(r, c, title is not None)
            canvas.paste(bordered(read_image(tile.path), tile.colour), (x, y))
            for number, line in enumerate(caption_lines(tile.caption, font)):
                draw.text((x + BORDER, y + TILE + 2 * BORDER + 2 + number * LINE), line, fill=TEXT, font=font)
    return canvas


def wrap(tiles: Sequence[Tile | None], columns: int) -> list[list[Tile | None]]:
    return [list(tiles[i:i + columns]) for i in range(0, len(tiles), columns)]


def save_image(image: Image.Image, path: str | Path, record: str | None = None) -> Path:
    """Atomically, in the format the suffix names (PNG stays lossless, so colours read back exactly).

    A PNG carries ``record``, the format of the output it belongs to, in a text chunk
    (:data:`reir.fileio.FORMAT_CHUNK`), so a later run knows it may replace it.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        return atomic_write_with(path, lambda tmp: image.save(tmp, format="JPEG"))
    chunks = PngImagePlugin.PngInfo()
    if record is not None:
        chunks.add_text(FORMAT_CHUNK, record)
    return atomic_write_with(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=chunks))


def result_caption(result: dict) -> str:
    """Rank and score, then the whole label on the lines below."""
    head = f"{result['rank']}: {result['score']:.4f}"
    return head if result.get("label") is None else f"{head}\n{shown_label(result['label'])}"


def save_search_pictures(folder: Path, query_path: str, label: str | None, results: list[dict], columns: int) -> None:
    """The grid, and the original's per-image files; older per-image files of this query are removed."""
    query_tile = Tile(query_path, "query" if label is None else f"query\n{shown_label(label)}", BLUE)
    tiles = [query_tile] + [Tile(r["path"], result_caption(r), status_colour(r["correct"])) for r in results]
    save_image(grid(wrap(tiles, columns)), folder / "grid.png", SEARCH_FORMAT)
    save_image(bordered(read_image(query_path), BLUE, FILE_SIZE, 0), folder / "query_img.jpg")
    written = set()
    for r in results:
        status = "" if r["correct"] is None else f"_{r['correct']}"
        name = f"retrieval_img_{r['rank']}_{r['score']:.4f}{status}.jpg"
        save_image(bordered(read_image(r["path"]), status_colour(r["correct"]), FILE_SIZE),
                       folder / name)
        written.add(name)
    for stale in folder.glob("retrieval_img_*.jpg"):
        if stale.name not in written:
            stale.unlink(missing_ok=True)
