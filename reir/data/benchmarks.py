"""Readers for the four benchmarks exactly as distributed: annotation files -> image records.

Each reader takes the dataset folder (``data/car`` ...) and returns :class:`Record` s with the
standard deep-metric-learning split (train and test classes disjoint). A malformed file is reported
with its name and line; nothing here touches the images themselves.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from reir.data.build import Record
from reir.errors import ReirError

FULL_NAMES = {"car": "CARS196", "cub": "CUB200-2011", "sop": "Stanford Online Products", "isc": "In-shop Clothes"}
CAR_FIELDS = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class")


def require(path: Path, name: str) -> Path:
    if not path.is_file():
        raise ReirError(f"{path} not found: unpack {FULL_NAMES[name]} under {path.parent} exactly as distributed "
                        "(see docs/DATASETS.md)")
    return path


def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every non-blank line."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ReirError(f"{path} is not a text file ({exc.reason}); download it again") from None
    return [(n, line.split()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def malformed(path: Path, line: int, expected: str, fields: list[str]) -> ReirError:
    return ReirError(f"{path} line {line} is malformed: expected {expected}, got {' '.join(fields)!r}; "
                     "download the file again")


def read_car(root: Path) -> list[Record]:
    """``cars_annos.mat``: classes 1-98 train, 99-196 test (the ``test`` field is not the DML split)."""
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    path = require(root / "cars_annos.mat", "car")
    try:
        annotations = np.atleast_1d(loadmat(str(path), squeeze_me=True)["annotations"])
    except KeyError:
        raise ReirError(f"{path} has no 'annotations' array; download cars_annos.mat again") from None
    except (MatReadError, ValueError, TypeError, IndexError, OSError, NotImplementedError) as exc:
        raise ReirError(f"{path} cannot be read as a MATLAB file ({str(exc) or type(exc).__name__}); "
                        "download it again") from None
    missing = [f for f in CAR_FIELDS if f not in (annotations.dtype.names or ())]
    if missing:
        raise ReirError(f"{path}: 'annotations' lacks the fields {', '.join(missing)}; download cars_annos.mat again")
    records = []
    for index, entry in enumerate(annotations, 1):
        where = f"{path.name} annotation {index}"
        try:
            relative = str(entry["relative_im_path"])
            label = int(entry["class"])
            box = tuple(float(entry[f]) for f in CAR_FIELDS[1:5])
        except (TypeError, ValueError):
            raise ReirError(f"{path} annotation {index} is malformed ({entry}); download it again") from None
        if not 1 <= label <= 196 or not relative:
            raise ReirError(f"{path} annotation {index}: class {label} is not in 1-196 or the path is empty; "
                            "download it again")
        records.append(Record("train" if label <= 98 else "test", root / relative, str(label), where, box))
    return records


def read_cub(root: Path) -> list[Record]:
    """``images.txt`` + ``image_class_labels.txt`` + ``bounding_boxes.txt``: classes 1-100 train, 101-200 test."""
    images_file = require(root / "images.txt", "cub")
    labels_file = require(root / "image_class_labels.txt", "cub")
    boxes_file = require(root / "bounding_boxes.txt", "cub")
    labels, boxes = {}, {}
    for n, fields in read_lines(labels_file):
        if len(fields) != 2 or not all(f.isascii() and f.isdigit() for f in fields) or not 1 <= int(fields[1]) <= 200:
            raise malformed(labels_file, n, "'<image id> <class 1-200>'", fields)
        labels[fields[0]] = int(fields[1])
    for n, fields in read_lines(boxes_file):
        try:
            if len(fields) != 5:
                raise ValueError
            x, y, width, height = (float(v) for v in fields[1:])
        except ValueError:
            raise malformed(boxes_file, n, "'<image id> <x> <y> <width> <height>'", fields) from None
        boxes[fields[0]] = (x, y, x + width, y + height)
    records = []
    for n, fields in read_lines(images_file):
        if len(fields) != 2:
            raise malformed(images_file, n, "'<image id> <relative path>'", fields)
        image_id, relative = fields
        for table, source in ((labels, labels_file), (boxes, boxes_file)):
            if image_id not in table:
                raise ReirError(f"{images_file} line {n}: image id {image_id} is missing from {source}; "
                                "download the dataset again")
        label = labels[image_id]
        records.append(Record("train" if label <= 100 else "test", root / "images" / relative, str(label),
                              f"{images_file.name} line {n}", boxes[image_id]))
    return records


def read_sop(root: Path) -> list[Record]:
    """``Ebay_train.txt`` / ``Ebay_test.txt``: a header, then ``<image_id> <class_id> <super_class_id> <path>``."""
    records = []
    for split in ("train", "test"):
        path = require(root / f"Ebay_{split}.txt", "sop")
        for n, fields in read_lines(path):
            if n == 1 and not (fields[0].isascii() and fields[0].isdigit()):
                continue  # the header
            if len(fields) != 4 or not all(f.isascii() and f.isdigit() for f in fields[:3]):
                raise malformed(path, n, "'<image_id> <class_id> <super_class_id> <path>'", fields)
            records.append(Record(split, root / fields[3], fields[1], f"{path.name} line {n}"))
    return records


def read_isc(root: Path) -> list[Record]:
    """``Eval/list_eval_partition.txt``: a count, a header, then ``<img/...jpg> <item_id> <train|query|gallery>``."""
    path = require(root / "Eval" / "list_eval_partition.txt", "isc")
    lines = read_lines(path)
    if not lines or len(lines[0][1]) != 1 or not (lines[0][1][0].isascii() and lines[0][1][0].isdigit()):
        raise malformed(path, lines[0][0] if lines else 1, "the number of images", lines[0][1] if lines else [])
    declared = int(lines[0][1][0])
    images = root / "Img" if (root / "Img").is_dir() else root
    records = []
    for n, fields in lines[2:]:
        if len(fields) != 3 or fields[2] not in ("train", "query", "gallery"):
            raise malformed(path, n, "'<image path> <item_id> <train|query|gallery>'", fields)
        records.append(Record(fields[2], images / fields[0], fields[1], f"{path.name} line {n}"))
    if declared != len(records):
        raise ReirError(f"{path} declares {declared} images on line 1 but lists {len(records)}; "
                        "the file is truncated or edited: download it again")
    return records


READERS = {"car": read_car, "cub": read_cub, "sop": read_sop, "isc": read_isc}
