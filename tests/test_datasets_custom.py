"""The user's own data: a CSV or a folder layout, prepared by hand or on the fly by train.py."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_args
from dataset_fixtures import box_for, make_custom_csv, make_custom_folder, write_image
from reir.cli.prepare import main as prepare_main
from reir.cli.train import main as train_main
from reir.data import custom
from reir.data.custom import load_custom
from reir.data.images import read_image
from reir.data.registry import IMAGENET_MEAN, IMAGENET_STD
from test_datasets import FAST, one_line_error


def train_once(data_path: Path, output: Path, crop_type: str = "uncropped") -> dict:
    assert train_main(tiny_args(data_path, output, *FAST, "--data_name", "custom", "--crop_type", crop_type)) == 0
    stem = f"custom_{crop_type}_fixed_unrandom_layer4_resnet18_3_2"
    rows = list(csv.DictReader((output / "statistics" / f"{stem}_results.csv").open()))
    assert len(rows) == 1
    return rows[0]


def test_csv_prepares_both_crops_beside_the_csv(tmp_path, capsys):
    path = make_custom_csv(tmp_path)
    assert prepare_main(["--data_name", "custom", "--data_path", str(path)]) == 0
    out = capsys.readouterr().out
    assert "custom uncropped: train 9 images / 3 classes, test 9 images / 3 classes" in out
    assert "custom cropped: train 9 images / 3 classes" in out
    base = tmp_path / ".reir" / "labels.csv" / "custom"
    uncropped = load_custom(path, "uncropped")
    cropped = load_custom(path, "cropped")
    assert uncropped.root == cropped.root == base
    # Uncropped lists point at the user's files (relative, so the folder can move); crops are files.
    assert uncropped.splits["train"].paths[0] == "../../../pics/a_0.jpg"
    assert Path(uncropped.absolute("train")[0]).resolve() == (tmp_path / "pics" / "a_0.jpg").resolve()
    for index, image in enumerate(cropped.absolute("train") + cropped.absolute("test")):
        x1, y1, x2, y2 = box_for(index)
        assert Image.open(image).size == (x2 - x1, y2 - y1)
    # Mean/std: measured on the training split, as training sees it (squashed to 256x256).
    pixels = np.concatenate([np.asarray(Image.open(tmp_path / p[len("../../../"):]).convert("RGB")
                                        .resize((256, 256), Image.BILINEAR), dtype=float).reshape(-1, 3) / 255
                             for p in uncropped.splits["train"].paths])
    assert np.allclose(uncropped.mean, pixels.mean(0), atol=1e-6)
    assert np.allclose(uncropped.std, pixels.std(0), atol=1e-6)


def test_imagenet_normalisation_by_flag_and_resize_cache(tmp_path, capsys):
    path = make_custom_csv(tmp_path, with_boxes=False)
    assert prepare_main(["--data_name", "custom", "--data_path", str(path), "--imagenet_norm", "--resize", "40"]) == 0
    assert "ImageNet" in capsys.readouterr().out
    prepared = load_custom(path, "uncropped")
    assert (prepared.mean, prepared.std) == (list(IMAGENET_MEAN), list(IMAGENET_STD))
    assert prepared.info["image_size"] == 40 and prepared.info["options"]["imagenet_norm"] is True
    assert all(Image.open(p).size == (40, 40) for p in prepared.absolute("test"))
    assert not (tmp_path / ".reir" / "labels.csv" / "custom" / "splits_cropped.json").exists()


def test_folder_layout_reads_every_pillow_format_as_rgb(tmp_path, capsys):
    root = make_custom_folder(tmp_path / "own")
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    write_image(root / "train" / "loose.jpg", 1)
    prepared = load_custom(root, "uncropped")
    captured = capsys.readouterr()
    assert "Preparing custom data" in captured.out
    assert "ignored 2 files" in captured.err
    assert set(prepared.splits["train"].labels) == {"cat", "dog", "fox"}
    assert (len(prepared.splits["train"]), len(prepared.splits["test"])) == (9, 12)
    suffixes = {Path(p).suffix for p in prepared.absolute("train") + prepared.absolute("test")}
    assert suffixes == {".jpg", ".png", ".bmp", ".gif"}
    modes = {Image.open(p).mode for p in prepared.absolute("train")}
    assert {"L", "RGBA", "CMYK", "P"} <= modes
    assert all(read_image(p).mode == "RGB" for p in prepared.absolute("train"))
    assert prepared.root == root / ".reir" / "custom"


def test_training_reuses_a_current_preparation_and_redoes_a_stale_one_saying_so(tmp_path, capsys):
    root = make_custom_folder(tmp_path / "own")
    assert prepare_main(["--data_name", "custom", "--data_path", str(root), "--resize", "24"]) == 0
    first = load_custom(root, "uncropped")
    capsys.readouterr()
    again = load_custom(root, "uncropped")
    assert "Preparing" not in capsys.readouterr().out and again.splits == first.splits
    write_image(root / "test" / "owl" / "late.jpg", 99)
    updated = load_custom(root, "uncropped")
    captured = capsys.readouterr()
    assert "Preparing" in captured.out
    warning = captured.err.strip().splitlines()[0]
    assert "changed since it was prepared" in warning and "21 listed then, 22 now" in warning, warning
    assert "--resize 24" in warning and "data_utils.py" in warning
    assert len(updated.splits["test"]) == len(first.splits["test"]) + 1
    assert updated.info["image_size"] == 24


def test_read_only_source_uses_the_user_cache(tmp_path, monkeypatch):
    root = make_custom_folder(tmp_path / "own")
    cache = tmp_path / "cache"
    monkeypatch.setenv("REIR_CACHE_DIR", str(cache))
    monkeypatch.setattr(custom, "probe_writable", lambda folder: not str(folder).startswith(str(root)))
    prepared = load_custom(root, "uncropped")
    assert not (root / ".reir").exists()
    assert prepared.root.parent.parent == cache
    assert all(os.path.isabs(p) and Path(p).is_file() for p in prepared.splits["train"].paths)
    assert load_custom(root, "uncropped").root == prepared.root


def test_csv_trains_and_evaluates_cropped_end_to_end(tmp_path):
    path = make_custom_csv(tmp_path / "own")
    row = train_once(path, tmp_path / "out", "cropped")
    assert 0.0 <= float(row["test_recall@1"]) <= 1.0


def test_folders_train_and_evaluate_end_to_end(tmp_path):
    root = make_custom_folder(tmp_path / "own")
    row = train_once(root, tmp_path / "out")
    assert 0.0 <= float(row["test_recall@8"]) <= 1.0


def test_query_gallery_folders_train_and_retrieve_query_against_gallery(tmp_path, capsys):
    from reir.retrieval.database import load_database

    root = make_custom_folder(tmp_path / "own", query_gallery=True)
    prepared = load_custom(root, "uncropped")
    assert prepared.eval_splits == ("query", "gallery")
    assert (len(prepared.splits["query"]), len(prepared.splits["gallery"])) == (3, 9)
    train_once(root, tmp_path / "out")
    database = next((tmp_path / "out" / "results").glob("*_data_base.safetensors"))
    assert {"query", "gallery", "train"} <= set(load_database(database).features)


# --- bad input ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content,words", [
    ("file,label,split\na.jpg,x,train\n", ["lacks the column(s) path", "path,label,split"]),
    ("path,label,split\npics/a.jpg,a,train\npics/b.jpg,b,validation\n", ["line 3", "'validation'", "train, test"]),
    ("path,label,split\npics/a.jpg,,train\n", ["line 2", "empty path or label"]),
    ("path,label,split,x1,y1,x2,y2\npics/a.jpg,a,train,1,2,x,4\n", ["line 2", "four numbers"]),
    ("path,label,split,x1,y1,x2,y2\npics/a.jpg,a,train,10,2,5,4\n", ["line 2", "is empty"]),
    ("path,label,split\n", ["lists no images"]),
])
def test_malformed_csv_names_the_line(tmp_path, capsys, content, words):
    path = tmp_path / "mine.csv"
    path.write_text(content)
    one_line_error(capsys, prepare_main(["--data_name", "custom", "--data_path", str(path)]), 1, str(path), *words)


def test_csv_errors_on_images_and_splits(tmp_path, capsys):
    path = make_custom_csv(tmp_path, with_boxes=False)
    args = ["--data_name", "custom", "--data_path", str(path)]
    one_line_error(capsys, prepare_main([*args, "--crop_type", "cropped"]), 2, "x1,y1,x2,y2", "uncropped")
    (tmp_path / "pics" / "b_4.jpg").unlink()
    one_line_error(capsys, prepare_main(args), 1, "b_4.jpg", "labels.csv line 6", "does not exist", "--skip_bad")
    assert not (tmp_path / ".reir" / "labels.csv" / "custom" / "splits_uncropped.json").exists()
    assert prepare_main([*args, "--skip_bad"]) == 0
    assert "skipped 1 unreadable images" in capsys.readouterr().err
    lines = path.read_text().splitlines()
    path.write_text("\n".join(line for line in lines if ",test" not in line) + "\n")
    one_line_error(capsys, prepare_main(args), 1, "no test images", "query + gallery")
    path.write_bytes(b"path,label,split\n\xff\xfe,a,train\n")
    one_line_error(capsys, prepare_main(args), 1, "not UTF-8")


def test_bad_folders(tmp_path, capsys):
    code = train_main(tiny_args(tmp_path / "nowhere", tmp_path / "out", "--data_name", "custom"))
    one_line_error(capsys, code, 2, "does not exist", "CSV file")
    (tmp_path / "half" / "train" / "a").mkdir(parents=True)
    one_line_error(capsys, prepare_main(["--data_name", "custom", "--data_path", str(tmp_path / "half")]), 1,
                   "needs train/<class>/ and test/<class>/")
    root = make_custom_folder(tmp_path / "both", query_gallery=True)
    write_image(root / "test" / "owl" / "x.jpg", 3)
    one_line_error(capsys, prepare_main(["--data_name", "custom", "--data_path", str(root)]), 1,
                   "either a test split or query + gallery")
    write_image(root / "query" / "zebra" / "lonely.jpg", 4)
    (root / "test" / "owl" / "x.jpg").unlink()
    (root / "test" / "owl").rmdir()
    (root / "test").rmdir()
    assert prepare_main(["--data_name", "custom", "--data_path", str(root)]) == 0
    assert "1 query images in 1 classes have no gallery image" in capsys.readouterr().err
    code = train_main(tiny_args(root, tmp_path / "out", "--data_name", "custom", "--crop_type", "cropped"))
    one_line_error(capsys, code, 2, "x1,y1,x2,y2")


def test_truncated_custom_image_keeps_the_previous_list(tmp_path, capsys):
    root = make_custom_folder(tmp_path / "own")
    good = load_custom(root, "uncropped")
    target = good.root / "splits_uncropped.json"
    before = target.read_bytes()
    victim = Path(good.absolute("test")[0])
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    capsys.readouterr()
    code = train_main(tiny_args(root, tmp_path / "out", "--data_name", "custom"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(err) == 2, err
    assert "changed since it was prepared" in err[0]  # why it is prepared again
    assert err[1].startswith("error:") and victim.name in err[1] and "cannot be read" in err[1]
    assert target.read_bytes() == before
