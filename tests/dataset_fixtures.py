"""Tiny copies of the four benchmarks in their official layouts, and of the user's own data.

Three training and three test classes of three images each: enough for ``--meta_class_size 2``.
Each image is a smooth colour field with a class-dependent hue, so crops and resizes are checkable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 64, 48
PER_CLASS = 3


def write_image(path: Path, seed: int, size=(WIDTH, HEIGHT), mode: str = "RGB", fmt: str | None = None) -> Path:
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    base = rng.uniform(40, 215, size=3)
    pixels = np.stack([base[c] + 30 * np.sin(x / (7 + c) + seed) + 20 * np.cos(y / 9) for c in range(3)], -1)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if mode != "RGB":
        image = image.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    jpeg = (fmt or path.suffix.lower()) in (".jpg", ".jpeg", "JPEG")
    image.save(path, format=fmt, **({"quality": 95} if jpeg else {}))
    return path


def box_for(index: int) -> tuple[int, int, int, int]:
    """A box inside a WIDTH x HEIGHT image that differs per image."""
    return 4 + index % 5, 3 + index % 4, 40 + index % 7, 30 + index % 6


def make_car(root: Path, outside_box: bool = True) -> dict:
    """``car/cars_annos.mat`` with the official struct fields, images under ``car_ims/``."""
    from scipy.io import savemat

    folder = root / "car"
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    entries, boxes = [], {}
    for label in (1, 2, 3, 99, 100, 101):
        for _ in range(PER_CLASS):
            index = len(entries) + 1
            relative = f"car_ims/{index:06d}.jpg"
            write_image(folder / relative, index)
            box = box_for(index)
            if outside_box and index == 2:
                box = (box[0], box[1], WIDTH + 20, box[3])
            boxes[relative] = box
            entries.append((relative, *[np.array([[v]], dtype=np.uint16) for v in box],
                            np.array([[label]], dtype=np.uint8), np.array([[index % 2]], dtype=np.uint8)))
    annotations = np.zeros((1, len(entries)), dtype=[(f, object) for f in fields])
    for i, entry in enumerate(entries):
        annotations[0, i] = entry
    class_names = np.array([f"Make Model {i}" for i in range(1, 197)], dtype=object)
    savemat(str(folder / "cars_annos.mat"), {"annotations": annotations, "class_names": class_names})
    return boxes


def make_cub(root: Path) -> dict:
    """``cub/images.txt``, ``image_class_labels.txt``, ``bounding_boxes.txt`` (floats), images under ``images/``."""
    folder = root / "cub"
    images, labels, boxes, splits, expected = [], [], [], [], {}
    for label in (1, 2, 3, 101, 102, 103):
        for k in range(PER_CLASS):
            index = len(images) + 1
            relative = f"{label:03d}.Bird_{label}/Bird_{label}_{k:04d}_{index}.jpg"
            write_image(folder / "images" / relative, 100 + index)
            x1, y1, x2, y2 = box_for(index)
            images.append(f"{index} {relative}")
            labels.append(f"{index} {label}")
            boxes.append(f"{index} {float(x1)} {float(y1)} {float(x2 - x1)} {float(y2 - y1)}")
            splits.append(f"{index} {k % 2}")
            expected[relative] = (x1, y1, x2, y2)
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("bounding_boxes.txt", boxes), ("train_test_split.txt", splits)):
        (folder / name).write_text("\n".join(lines) + "\n")
    (folder / "classes.txt").write_text("".join(f"{i} {i:03d}.Bird_{i}\n" for i in range(1, 201)))
    return expected


def make_sop(root: Path) -> None:
    """``sop/Ebay_train.txt`` / ``Ebay_test.txt`` with their header; classes 1-3 train, 4-6 test."""
    folder = root / "sop"
    image_id = 0
    for split, classes in (("train", (1, 2, 3)), ("test", (4, 5, 6))):
        lines = ["image_id class_id super_class_id path"]
        for label in classes:
            for k in range(PER_CLASS):
                image_id += 1
                relative = f"bicycle_final/{label}{k:02d}000_{k}.JPG"
                write_image(folder / relative, 200 + image_id, fmt="JPEG")
                lines.append(f"{image_id} {label} 1 {relative}")
        (folder / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")


def make_isc(root: Path) -> None:
    """``isc/Eval/list_eval_partition.txt`` (count line, header line), images under ``Img/img/``."""
    folder = root / "isc"
    rows = []
    items = [("id_00000001", "train"), ("id_00000002", "train"), ("id_00000003", "train"),
             ("id_00000004", None), ("id_00000005", None), ("id_00000006", None)]
    for item, split in items:
        for k in range(PER_CLASS):
            relative = f"img/WOMEN/Dresses/{item}/{k + 1:02d}_{k + 1}_front.jpg"
            write_image(folder / "Img" / relative, 300 + len(rows))
            rows.append(f"{relative}{' ' * 20}{item}{' ' * 8}{split or ('query' if k == 0 else 'gallery')}")
    (folder / "Eval").mkdir(parents=True, exist_ok=True)
    (folder / "Eval" / "list_eval_partition.txt").write_text(
        f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")


def make_custom_folder(root: Path, query_gallery: bool = False) -> Path:
    """``root/train/<class>/*`` and ``root/test/<class>/*`` (or query/ and gallery/), mixed formats and modes."""
    modes = [("RGB", ".jpg"), ("L", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("RGB", ".bmp"), ("P", ".gif")]
    count = 0
    eval_splits = ("query", "gallery") if query_gallery else ("test",)
    for split, classes in (("train", ("cat", "dog", "fox")), ("eval", ("owl", "bee", "ant"))):
        for label in classes:
            for k in range(PER_CLASS + (1 if split == "eval" else 0)):
                mode, suffix = modes[count % len(modes)]
                target = split if split == "train" else eval_splits[min(k, len(eval_splits) - 1)]
                write_image(root / target / label / f"img_{count}{suffix}", 400 + count, mode=mode)
                count += 1
    return root


def make_custom_csv(root: Path, with_boxes: bool = True) -> Path:
    """``root/labels.csv`` with path,label,split[,x1,y1,x2,y2]; images in ``root/pics``."""
    lines = ["path,label,split" + (",x1,y1,x2,y2" if with_boxes else "")]
    count = 0
    for split, classes in (("train", ("a", "b", "c")), ("test", ("d", "e", "f"))):
        for label in classes:
            for _ in range(PER_CLASS):
                relative = f"pics/{label}_{count}.jpg"
                write_image(root / relative, 500 + count)
                box = ",".join(str(v) for v in box_for(count)) if with_boxes else ""
                lines.append(f"{relative},{label},{split}" + (f",{box}" if with_boxes else ""))
                count += 1
    path = root / "labels.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
