"""The user's own images: a CSV (``path,label,split[,x1,y1,x2,y2]``) or a folder per split and class.

The prepared split list is kept beside the source (``<folder>/.reir/custom/`` or
``<csv folder>/.reir/<csv name>/custom/``) so it travels with the data; when that place is not
writable it goes to ``$REIR_CACHE_DIR`` (default ``~/.cache/reir``) under a hash of the source path,
and the source is never written to. Training reuses a preparation while the source is unchanged
(same listing, sizes and modification times) and prepares again, with the same options, otherwise.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from reir.data.build import Record, build_split_list, probe_writable, report
from reir.data.registry import IMAGENET_MEAN, IMAGENET_STD
from reir.data.splits import SplitList, load_split_list, split_list_path
from reir.errors import ReirError, UsageError

log = logging.getLogger(__name__)

SPLITS = ("train", "test", "query", "gallery")
BOX_COLUMNS = ("x1", "y1", "x2", "y2")


@contextlib.contextmanager
def open_user_csv(path: Path) -> Iterator[csv.DictReader]:
    """A reader over a user's CSV with trimmed column names; bad text or quoting is a one-line error."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
            yield reader
    except UnicodeDecodeError as exc:
        raise ReirError(f"{path} is not UTF-8 text ({exc.reason}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise ReirError(f"{path} is not a valid CSV ({exc}); check its quoting") from None


def read_csv(path: Path) -> tuple[list[Record], bool]:
    """Rows of ``path,label,split`` (paths relative to the CSV); also: does every row carry a box?"""
    with open_user_csv(path) as reader:
        columns = reader.fieldnames or []
        missing = [c for c in ("path", "label", "split") if c not in columns]
        if missing:
            raise ReirError(f"{path} lacks the column(s) {', '.join(missing)}: the first line must name "
                            "path,label,split (and optionally x1,y1,x2,y2)")
        has_box_columns = set(BOX_COLUMNS) <= set(columns)
        records, boxed = [], has_box_columns
        for row in reader:
            n = reader.line_num
            if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
                continue
            where = f"{path.name} line {n}"
            image, label, split = ((row.get(c) or "").strip() for c in ("path", "label", "split"))
            if not image or not label:
                raise ReirError(f"{path} line {n}: empty path or label; every row needs both")
            if split not in SPLITS:
                raise ReirError(f"{path} line {n}: split {split!r} must be one of {', '.join(SPLITS)}")
            box = None
            if has_box_columns:
                values = [(row.get(c) or "").strip() for c in BOX_COLUMNS]
                if any(values):
                    try:
                        box = tuple(float(v) for v in values)
                    except ValueError:
                        raise ReirError(f"{path} line {n}: box {','.join(values)!r} must be four numbers "
                                        "x1,y1,x2,y2 (pixels)") from None
                    if box[2] <= box[0] or box[3] <= box[1]:
                        raise ReirError(f"{path} line {n}: box {','.join(values)} is empty; "
                                        "x2 must exceed x1 and y2 exceed y1")
                boxed = boxed and box is not None
            source = Path(image) if os.path.isabs(image) else path.parent / image
            records.append(Record(split, source, label, where, box))
    if not records:
        raise ReirError(f"{path} lists no images; add rows of path,label,split")
    return records, boxed


def read_folder(root: Path) -> list[Record]:
    """``root/<split>/<class>/<images>`` for train and test, or train, query and gallery."""
    present = [s for s in SPLITS if (root / s).is_dir()]
    if "train" not in present or not ("test" in present or {"query", "gallery"} <= set(present)):
        raise ReirError(f"{root} is not a custom dataset folder: it needs train/<class>/ and test/<class>/ "
                        "(or query/<class>/ and gallery/<class>/) subfolders, or give a CSV file")
    extensions = {e.lower() for e in Image.registered_extensions()}
    records, ignored = [], 0
    for split in present:
        for path in sorted((root / split).rglob("*")):
            relative = path.relative_to(root / split)
            if any(part.startswith(".") for part in relative.parts) or not path.is_file():
                continue
            if len(relative.parts) < 2 or path.suffix.lower() not in extensions:
                ignored += 1
                continue
            records.append(Record(split, path, relative.parts[0], f"{split}/{relative.as_posix()}"))
    if ignored:
        log.warning("ignored %d files in %s that are not images inside a class folder", ignored, root)
    return records


def read_source(source: Path) -> tuple[list[Record], bool]:
    if source.is_file():
        return read_csv(source)
    if source.is_dir():
        return read_folder(source), False
    raise UsageError(f"custom data {source} does not exist: give `data_path` a CSV file (path,label,split) "
                     "or a folder with train/ and test/ class folders")


def cache_bases(source: Path) -> list[Path]:
    """Where a custom split list may live: beside the source first, then the user cache."""
    source = source.resolve()
    beside = source.parent / ".reir" / source.name if source.is_file() else source / ".reir"
    digest = hashlib.sha1(str(source).encode()).hexdigest()[:16]
    user = Path(os.environ.get("REIR_CACHE_DIR") or Path.home() / ".cache" / "reir") / digest
    return [beside, user]


def fingerprint(records: list[Record]) -> str:
    """Changes when an image is added, removed, relabelled, re-boxed or modified."""
    digest = hashlib.sha1()
    for r in records:
        try:
            stat = r.source.stat()
            state = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            state = "missing"
        digest.update(f"{r.split}\t{r.label}\t{r.source.resolve()}\t{r.box}\t{state}\n".encode())
    return digest.hexdigest()


def prepare_custom(source: str | Path, crop_type: str, resize: int = 0, skip_bad: bool = False,
                   imagenet_norm: bool = False, workers: int | None = None,
                   records: list[Record] | None = None, overwrite: bool = False,
                   setting: str = "overwrite") -> SplitList:
    """Prepare ``source`` into a split list (see the module docstring for where) and log its counts."""
    source = Path(source)
    if records is None:
        records, boxed = read_source(source)
    else:
        boxed = all(r.box is not None for r in records)
    if crop_type == "cropped" and not boxed:
        raise UsageError(f"`crop_type` cropped needs a bounding box x1,y1,x2,y2 on every row of a CSV; {source} "
                         "has none (or not on every row): use `crop_type` uncropped")
    base = next((b for b in cache_bases(source) if probe_writable(b)), None)
    if base is None:
        raise ReirError(f"no writable place for the prepared list of {source}; set REIR_CACHE_DIR to a writable folder")
    beside = base == cache_bases(source)[0]
    info = {"source": str(source.resolve()), "fingerprint": fingerprint(records),
            "options": {"resize": resize, "skip_bad": skip_bad, "imagenet_norm": imagenet_norm}}
    result = build_split_list(
        records, data_name="custom", crop_type=crop_type, target=split_list_path(base, "custom", crop_type),
        image_root=source.parent if source.is_file() else source, resize=resize, skip_bad=skip_bad,
        workers=workers, mean=IMAGENET_MEAN if imagenet_norm else None, std=IMAGENET_STD if imagenet_norm else None,
        absolute_paths=not beside, info=info, overwrite=overwrite, setting=setting)
    report(result, None, f"custom {crop_type}")
    train, evaluated = set(result.split_list.splits["train"].labels), set()
    for name in result.split_list.eval_splits:
        evaluated |= set(result.split_list.splits[name].labels)
    if train & evaluated:
        log.warning("%d classes appear in both training and evaluation splits "
                    "(allowed; the benchmarks keep them disjoint)", len(train & evaluated))
    log.info(f"mean {_fmt(result.split_list.mean)}, std {_fmt(result.split_list.std)} "
             f"({'ImageNet' if imagenet_norm else 'measured on the training split'}); "
             f"split list {result.split_list.root}")
    return result.split_list


def load_custom(source: str | Path, crop_type: str) -> SplitList:
    """For training: reuse a preparation of ``source`` that is still current, else prepare it, saying why."""
    source = Path(source)
    records, _ = read_source(source)
    current = fingerprint(records)
    stale = None
    for base in cache_bases(source):
        path = split_list_path(base, "custom", crop_type)
        if not path.is_file():
            continue
        try:
            prepared = load_split_list(path)
        except ReirError:
            continue
        if prepared.info.get("fingerprint") == current:
            return prepared
        stale = stale or prepared
    options = dict(stale.info.get("options") or {}) if stale else {}
    if stale:
        listed = sum(len(split) for split in stale.splits.values())
        log.warning("custom data %s changed since it was prepared (images added, removed, relabelled or modified: "
                    "%d listed then, %d now); preparing it again with the options it was prepared with (%s). "
                    "To choose others, run data_utils.py `data_name` custom first", source, listed, len(records),
                    option_flags(options))
    log.info("Preparing custom data %s (%s)", source, crop_type)
    return prepare_custom(source, crop_type, records=records, **options)


def option_flags(options: dict) -> str:
    """``{"resize": 40, "imagenet_norm": True}`` as the data_utils.py settings that give it."""
    flags = [f"`{name}` {value}" if not isinstance(value, bool) else f"`{name}`"
             for name, value in options.items() if value]
    return " ".join(flags) or "no options"


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4f}" for v in values) + ")"
