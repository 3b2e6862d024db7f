"""Turn a list of images (from annotation files or the user's CSV/folders) into a split list.

Every image is decoded once here, so a truncated or unreadable file is found before training, not in
the middle of an epoch. Images that have to be written (bounding-box crops, the resize cache) go into
a new generation folder next to the split list; only when every image is written is the split list
replaced (atomically), and only then are older generations removed. A failed or interrupted run
therefore always leaves the previous preparation usable.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from reir.data.splits import FORMAT as SPLITS_FORMAT
from reir.data.splits import Split, SplitList, load_split_list, save_split_list
from reir.errors import ReirError
from reir.fileio import atomic_write, claim_output, ensure_dir

log = logging.getLogger(__name__)

GENERATION_MARKER = ".reir-generation"
LOSSLESS = {".png"}
KEPT_SUFFIXES = {".jpg", ".jpeg", ".png"}
# Below this many images a process pool costs more than it saves.
POOL_THRESHOLD = 256
# Custom mean/std are measured on images squashed to this square, as training sees them.
STATS_SIZE = 256


@dataclass
class Record:
    """One image to prepare: where it is, its class, its split, and where it was listed."""

    split: str
    source: Path
    label: str
    where: str
    box: tuple[float, ...] | None = None


@dataclass
class Result:
    split_list: SplitList
    skipped: list[str]
    clamped: int


def crop_box(box, width: int, height: int) -> tuple[tuple[int, int, int, int] | None, bool]:
    """Integer box clamped to the image; ``None`` when nothing of it lies inside. Also: was it clamped?"""
    x1, y1, x2, y2 = (int(v) for v in box)
    clamped = (max(0, min(x1, width)), max(0, min(y1, height)), max(0, min(x2, width)), max(0, min(y2, height)))
    if clamped[2] <= clamped[0] or clamped[3] <= clamped[1]:
        return None, True
    return clamped, clamped != (x1, y1, x2, y2)


def process_image(task) -> tuple:
    """Decode (fully: truncation is detected), crop, resize, write, measure. Runs in worker processes.

    Returns ``("ok", clamped, mean, mean_of_squares)`` or ``(kind, reason)`` for a bad image.
    """
    source, dest, box, resize, want_stats = task
    try:
        with Image.open(source) as image:
            image.load()
            rgb = image.convert("RGB")
    except FileNotFoundError:
        return ("missing", "does not exist")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return ("bad", f"cannot be read ({str(exc) or type(exc).__name__})")
    clamped = False
    if box is not None:
        inside, clamped = crop_box(box, *rgb.size)
        if inside is None:
            return ("box", f"bounding box {tuple(box)} lies outside the {rgb.size[0]}x{rgb.size[1]} image")
        rgb = rgb.crop(inside)
    if resize:
        # Bilinear, as torchvision's Resize on a PIL image: training at this size sees the same pixels.
        rgb = rgb.resize((resize, resize), Image.Resampling.BILINEAR)
    if dest is not None:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if Path(dest).suffix.lower() in LOSSLESS:
            rgb.save(dest, format="PNG")
        else:
            rgb.save(dest, format="JPEG", quality=95)
    mean = squares = None
    if want_stats:
        small = (rgb if rgb.size == (STATS_SIZE, STATS_SIZE)
                 else rgb.resize((STATS_SIZE, STATS_SIZE), Image.Resampling.BILINEAR))
        pixels = np.asarray(small, dtype=np.float64).reshape(-1, 3) / 255.0
        mean, squares = pixels.mean(0), (pixels ** 2).mean(0)
    return ("ok", clamped, mean, squares)


def cache_name(source: Path, image_root: Path) -> str:
    """Path of an image's written copy inside a generation folder: its path under the dataset root."""
    try:
        relative = source.resolve().relative_to(image_root.resolve()).as_posix()
    except ValueError:
        digest = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
        relative = f"_outside/{digest}_{source.name}"
    if Path(relative).suffix.lower() not in KEPT_SUFFIXES:
        relative += ".png" if source.suffix.lower() in {".bmp", ".tif", ".tiff", ".gif", ".webp"} else ".jpg"
    return relative


def build_split_list(records: list[Record], *, data_name: str, crop_type: str, target: Path, image_root: Path,
                     resize: int, skip_bad: bool, workers: int | None, mean=None, std=None,
                     absolute_paths: bool = False, info: dict | None = None, overwrite: bool = False,
                     setting: str = "overwrite") -> Result:
    """Process ``records`` and atomically write the split list ``target``.

    ``mean``/``std`` ``None``: measured on the training split as stored. Crops and resized copies go
    to a new generation folder beside ``target``; otherwise the list points at the originals. An
    existing ``target`` that is not a split list is replaced only with ``overwrite`` (which the
    caller's user sets with ``setting``).
    """
    claim_output(target, (SPLITS_FORMAT,), overwrite=overwrite, setting=setting)
    check_splits({r.split for r in records}, target)
    folder = ensure_dir(target.parent)
    crop = crop_type == "cropped"
    write = crop or resize > 0
    generation = None
    if write:
        tag = f"{resize}px" if resize else "full"
        generation = folder / f"{crop_type}_{tag}.{secrets.token_hex(4)}"
        generation.mkdir()
        atomic_write(generation / GENERATION_MARKER, f"images of {target.name}\n")
    try:
        names: list[str | None] = []  # in the generation folder; None: the original is listed
        used: dict[str, tuple] = {}
        for record in records:
            if generation is None:
                names.append(None)
                continue
            name = cache_name(record.source, image_root)
            key = (str(record.source), record.box if crop else None)
            stem, count = name, 1
            while used.setdefault(name, key) != key:  # the same file listed with another box
                count += 1
                name = f"{Path(stem).with_suffix('')}__{count}{Path(stem).suffix}"
            names.append(name)
        tasks = [(str(r.source), str(generation / n) if generation and n else None, r.box if crop else None, resize,
                  mean is None and r.split == "train") for r, n in zip(records, names)]
        splits: dict[str, Split] = {}
        skipped, clamped, means, squares = [], 0, [], []
        with contextlib.closing(_run(tasks, workers, f"{data_name} {crop_type}")) as results:
            for record, stored, outcome in zip(records, names, results):
                if outcome[0] != "ok":
                    message = f"image {record.source} ({record.where}) {outcome[1]}"
                    if not skip_bad:
                        hint = ("fix the box" if outcome[0] == "box" else "restore or replace it")
                        raise ReirError(f"{message}; {hint}, or prepare with `skip_bad` to leave it out")
                    skipped.append(message)
                    continue
                clamped += outcome[1]
                if outcome[2] is not None:
                    means.append(outcome[2])
                    squares.append(outcome[3])
                if generation is not None and stored is not None:
                    path = f"{generation.name}/{stored}"
                elif absolute_paths:
                    path = str(record.source.resolve())
                else:
                    path = os.path.relpath(record.source, folder).replace(os.sep, "/")
                split = splits.setdefault(record.split, Split([], []))
                split.paths.append(path)
                split.labels.append(record.label)
        check_splits([name for name, split in splits.items() if len(split)], target)
        if mean is None:
            mean = np.mean(means, axis=0)
            std = np.sqrt(np.maximum(np.mean(squares, axis=0) - mean ** 2, 0.0))
        info = {**(info or {}), "image_size": resize or None, "skipped": len(skipped), "clamped_boxes": clamped}
        save_split_list(target, data_name, crop_type, mean, std, splits, info)
    except BaseException:
        if generation is not None:
            shutil.rmtree(generation, ignore_errors=True)
        raise
    remove_old_generations(folder, crop_type, keep=generation)
    return Result(load_split_list(target), skipped, clamped)


def _run(tasks: list[tuple], workers: int | None, desc: str):
    """Results in task order, lazily: a bad image stops the run without waiting for the rest."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if len(tasks) >= POOL_THRESHOLD else 0
    bar = dict(total=len(tasks), desc=f"Prepare {desc}", file=sys.stdout, disable=not sys.stdout.isatty())
    if workers <= 1:
        yield from (process_image(task) for task in tqdm(tasks, **bar))
        return
    pool = ProcessPoolExecutor(max_workers=workers)
    try:
        yield from tqdm(pool.map(process_image, tasks, chunksize=32), **bar)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def check_splits(names, target: Path) -> None:
    """Training needs a train split; evaluation a test split, or query and gallery, not both."""
    names = set(names)
    if "train" not in names:
        raise ReirError(f"no training images for {target}; check the annotation files and images")
    if "test" in names and ("query" in names or "gallery" in names):
        raise ReirError(f"{target}: give either a test split or query + gallery splits, not both")
    if "test" not in names and not {"query", "gallery"} <= names:
        missing = "gallery" if "query" in names else "query" if "gallery" in names else "test"
        raise ReirError(f"no {missing} images for {target}: evaluation needs a test split or query + gallery")


def remove_old_generations(folder: Path, crop_type: str, keep: Path | None) -> None:
    """Delete generation folders of ``crop_type`` (ours: they hold the marker) other than ``keep``."""
    for old in folder.glob(f"{crop_type}_*.*"):
        if old.is_dir() and old != keep and (old / GENERATION_MARKER).is_file():
            shutil.rmtree(old, ignore_errors=True)


def summarize(split_list: SplitList, published: dict[str, tuple[int, int]] | None, label: str) -> str | None:
    """Log images and classes per split; return a warning when they differ from the published counts."""
    counts = {name: (len(s), len(set(s.labels))) for name, s in split_list.splits.items()}
    size = split_list.info.get("image_size")
    log.info(f"{label}: " + ", ".join(f"{name} {n:,} images / {c:,} classes" for name, (n, c) in counts.items())
             + (f" (resized to {size}x{size})" if size else ""))
    wrong = [f"{name} {counts.get(name, (0, 0))[0]:,} images / {counts.get(name, (0, 0))[1]:,} classes "
             f"(published {n:,} / {c:,})" for name, (n, c) in (published or {}).items() if counts.get(name) != (n, c)]
    if wrong:
        return (f"{label} does not match the published dataset: {'; '.join(wrong)}. A partial download or edited "
                "annotation files? Results will not be comparable with published ones")
    return None


def unanswerable(split_list: SplitList, label: str) -> list[str]:
    """Queries that no retrieval can answer: their class has no other image to find."""
    if split_list.query_gallery:
        gallery = set(split_list.splits["gallery"].labels)
        lonely = [label for label in split_list.splits["query"].labels if label not in gallery]
        if lonely:
            return [f"{label}: {len(lonely)} query images in {len(set(lonely))} classes have no gallery image "
                    "of their class; they cannot be answered and count as misses"]
        return []
    single = sum(1 for count in Counter(split_list.splits["test"].labels).values() if count < 2)
    if single:
        return [f"{label}: {single} test classes have fewer than 2 images; their {single} queries cannot be "
                "answered and count as misses"]
    return []


def report(result: Result, published, label: str) -> None:
    """Counts as information; skipped images, clamped boxes, unanswerable queries and count mismatches as warnings."""
    for message in result.skipped[:5]:
        log.warning("skipped %s", message)
    if result.skipped:
        log.warning("%s: skipped %d unreadable images (`skip_bad`)", label, len(result.skipped))
    if result.clamped:
        log.warning("%s: %d bounding boxes reached outside their image and were clamped", label, result.clamped)
    mismatch = summarize(result.split_list, published, label)
    for warning in unanswerable(result.split_list, label):
        log.warning(warning)
    if mismatch:
        log.warning(mismatch, extra={"loud": True})


def probe_writable(folder: Path) -> bool:
    """Can we create files in ``folder`` (created if needed)? Checked by trying, as permissions lie for root."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{secrets.token_hex(4)}"
        atomic_write(probe, b"")
        probe.unlink()
        return True
    except (OSError, ReirError):
        return False
