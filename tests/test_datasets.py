"""The four benchmarks in their official layouts: splits, crops, counts, the cache, bad input, training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_reir, run_script, tiny_args
from dataset_fixtures import PER_CLASS, WIDTH, make_car, make_cub, make_isc, make_sop
from reir.cli.prepare import main as prepare_main
from reir.cli.prepare import prepare_benchmark
from reir.cli.train import main as train_main
from reir.data import BENCHMARKS, load_split_list, split_list_path
from reir.data.images import build_transform, read_image

# Only the classifiers are per branch: an epoch takes a fraction of the time and still trains end to end.
FAST = ("--share_type", "layer4")


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """All four benchmarks, as distributed, prepared once with the default 256 px cache."""
    root = tmp_path_factory.mktemp("official")
    boxes = {"car": make_car(root), "cub": make_cub(root)}
    make_sop(root)
    make_isc(root)
    assert prepare_main(["--data_path", str(root)]) == 0
    return root, boxes


def one_line_error(capsys, code: int, expected_code: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == expected_code, err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err
    for word in words:
        assert word in err, err
    return err


def test_car_splits_by_class_and_crops_to_the_box(tmp_path, capsys):
    boxes = make_car(tmp_path)
    uncropped = prepare_benchmark(tmp_path, "car", "uncropped", resize=0)
    cropped = prepare_benchmark(tmp_path, "car", "cropped", resize=0)
    err = capsys.readouterr().err
    assert "*** WARNING: car uncropped does not match the published dataset: train 9 images / 3 classes " \
           "(published 8,054 / 98)" in err
    assert "1 bounding boxes reached outside their image and were clamped" in err
    for split_list in (uncropped, cropped):
        assert set(split_list.splits["train"].labels) == {"1", "2", "3"}
        assert set(split_list.splits["test"].labels) == {"99", "100", "101"}
        assert split_list.mean == list(BENCHMARKS["car"].mean) and split_list.std == list(BENCHMARKS["car"].std)
    # Uncropped without a cache points at the official files themselves.
    assert [Path(p).resolve() for p in uncropped.absolute("train")] == \
           [(tmp_path / "car" / f"car_ims/{i:06d}.jpg").resolve() for i in range(1, 10)]
    assert cropped.info["clamped_boxes"] == 1
    for path, _label in zip(cropped.absolute("train") + cropped.absolute("test"),
                           cropped.splits["train"].labels + cropped.splits["test"].labels):
        x1, y1, x2, y2 = boxes["car_ims/" + Path(path).name]
        assert Image.open(path).size == (min(x2, WIDTH) - x1, y2 - y1)
    # The crop holds the pixels of the box.
    first = cropped.absolute("train")[0]
    x1, y1, x2, y2 = boxes["car_ims/000001.jpg"]
    original = np.asarray(read_image(str(tmp_path / "car/car_ims/000001.jpg")).crop((x1, y1, x2, y2)), dtype=float)
    assert np.abs(np.asarray(read_image(first), dtype=float) - original).mean() < 3


def test_cub_uses_class_ranges_float_boxes_and_the_cache_size(official):
    root, boxes = official
    cropped = load_split_list(split_list_path(root, "cub", "cropped"))
    assert set(cropped.splits["train"].labels) == {"1", "2", "3"}
    assert set(cropped.splits["test"].labels) == {"101", "102", "103"}
    assert cropped.info["image_size"] == 256
    assert all(Image.open(p).size == (256, 256) for p in cropped.absolute("test"))
    full = prepare_benchmark(root, "cub", "cropped", resize=0)
    generation = full.root / full.splits["train"].paths[0].split("/")[0]
    for path in full.absolute("train"):
        x1, y1, x2, y2 = boxes["cub"][Path(path).relative_to(generation / "images").as_posix()]
        assert Image.open(path).size == (x2 - x1, y2 - y1)


def test_sop_skips_the_header_and_keeps_train_and_test_classes(official):
    root, _ = official
    sop = load_split_list(split_list_path(root, "sop", "uncropped"))
    assert [len(sop.splits[s]) for s in ("train", "test")] == [3 * PER_CLASS, 3 * PER_CLASS]
    assert set(sop.splits["train"].labels) == {"1", "2", "3"} and set(sop.splits["test"].labels) == {"4", "5", "6"}
    assert all(Path(p).is_file() and Path(p).suffix == ".JPG" for p in sop.absolute("test"))


def test_isc_reads_query_and_gallery_under_img(official):
    root, _ = official
    isc = load_split_list(split_list_path(root, "isc", "uncropped"))
    assert isc.eval_splits == ("query", "gallery")
    assert (len(isc.splits["train"]), len(isc.splits["query"]), len(isc.splits["gallery"])) == (9, 3, 6)
    assert set(isc.splits["query"].labels) == set(isc.splits["gallery"].labels) == \
           {"id_00000004", "id_00000005", "id_00000006"}
    assert all("/Img/img/WOMEN/Dresses/" in p for p in isc.absolute("gallery"))


def test_cached_training_input_matches_the_original_files(tmp_path):
    make_cub(tmp_path)
    size = 48
    transform = build_transform(size, [0, 0, 0], [1, 1, 1], train=False)
    cached = prepare_benchmark(tmp_path, "cub", "cropped", resize=size)
    assert all(Image.open(p).size == (size, size) for p in cached.absolute("train"))
    from_cache = [transform(read_image(p)) for p in cached.absolute("train")]
    direct = prepare_benchmark(tmp_path, "cub", "cropped", resize=0)
    for a, path in zip(from_cache, direct.absolute("train")):
        difference = (a - transform(read_image(path))).abs()
        assert difference.mean() < 0.01 and difference.max() < 0.1  # JPEG re-encoding only
    assert not any(tmp_path.joinpath("cub").glob(f"cropped_{size}px.*")), "the replaced generation is removed"


def test_data_utils_prepares_every_benchmark_present(tmp_path):
    make_sop(tmp_path)
    make_isc(tmp_path)
    result = run_script("data_utils.py", "--data_path", str(tmp_path), "--resize", "0")
    assert result.returncode == 0, result.stderr
    assert "sop uncropped: train 9 images / 3 classes, test 9 images / 3 classes" in result.stdout
    assert "isc uncropped: train 9 images / 3 classes, query 3 images / 3 classes, gallery 6 images" in result.stdout
    assert result.stderr.count("*** WARNING") == 2
    assert split_list_path(tmp_path, "sop", "uncropped").is_file()
    assert not split_list_path(tmp_path, "car", "uncropped").exists()
    listed = run_reir("prepare", "--help")
    assert listed.returncode == 0 and "--skip_bad" in listed.stdout


@pytest.mark.parametrize("data_name,crop_type", [("car", "cropped"), ("cub", "uncropped"), ("sop", "uncropped"),
                                                 ("isc", "uncropped")])
def test_one_training_epoch_on_each_prepared_benchmark(official, tmp_path, data_name, crop_type):
    root, _ = official
    assert train_main(tiny_args(root, tmp_path, *FAST, "--data_name", data_name, "--crop_type", crop_type)) == 0
    stem = f"{data_name}_{crop_type}_fixed_unrandom_layer4_resnet18_3_2"
    rows = list(csv.DictReader((tmp_path / "statistics" / f"{stem}_results.csv").open()))
    assert len(rows) == 1 and 0.0 <= float(rows[0]["test_recall@1"]) <= 1.0
    assert (tmp_path / "results" / f"{stem}_data_base.safetensors").is_file()


# --- bad input ---------------------------------------------------------------------------------------------


def test_missing_folder_and_missing_datasets(tmp_path, capsys):
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "car"]), 1,
                   str(tmp_path / "car"), "not found", "unpack")



def test_prepare_without_benchmarks_lists_the_embedded_datasets_found_or_buildable(tmp_path, capsys):
    from reir.data.digits import prepare_digits

    prepare_digits(tmp_path)
    assert prepare_main(["--data_path", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "no benchmark under" in lines[0]
    assert lines[1:] == [f"  digits: ready in {tmp_path / 'digits' / 'splits_uncropped.json'}",
                         "  glyphs: not built yet: python data_utils.py --data_name glyphs",
                         "  fonts: not built yet: python data_utils.py --data_name fonts",
                         "  typefaces: not built yet: python data_utils.py --data_name typefaces"]


def test_missing_annotation_file(tmp_path, capsys):
    make_cub(tmp_path)
    (tmp_path / "cub" / "bounding_boxes.txt").unlink()
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "cub"]), 1,
                   "bounding_boxes.txt not found")


@pytest.mark.parametrize("name,file,line_no,bad", [
    ("cub", "image_class_labels.txt", 4, "4 sparrow"),
    ("cub", "bounding_boxes.txt", 2, "2 1.0 2.0 three 4.0"),
    ("cub", "images.txt", 3, "3"),
    ("sop", "Ebay_test.txt", 3, "12 5 1"),
    ("isc", "Eval/list_eval_partition.txt", 5, "img/x.jpg id_1 validation"),
])
def test_malformed_line_names_file_and_line(tmp_path, capsys, name, file, line_no, bad):
    {"cub": make_cub, "sop": make_sop, "isc": make_isc}[name](tmp_path)
    path = tmp_path / name / file
    lines = path.read_text().splitlines()
    lines[line_no - 1] = bad
    path.write_text("\n".join(lines) + "\n")
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", name]), 1,
                   f"{path} line {line_no} is malformed")


def test_isc_count_line_must_match(tmp_path, capsys):
    make_isc(tmp_path)
    path = tmp_path / "isc" / "Eval" / "list_eval_partition.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-2]) + "\n")
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "isc"]), 1,
                   "declares 18 images on line 1 but lists 16")


def test_car_annotations_without_official_fields(tmp_path, capsys):
    from scipy.io import savemat

    make_car(tmp_path)
    entries = np.zeros((1, 1), dtype=[("relative_im_path", object), ("class", object)])
    entries[0, 0] = ("car_ims/000001.jpg", 1)
    savemat(str(tmp_path / "car" / "cars_annos.mat"), {"annotations": entries})
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "car"]), 1,
                   "lacks the fields bbox_x1, bbox_y1, bbox_x2, bbox_y2")
    (tmp_path / "car" / "cars_annos.mat").write_bytes(b"not a mat file at all")
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "car"]), 1,
                   "cars_annos.mat")


def test_truncated_image_fails_or_is_skipped(tmp_path, capsys):
    make_sop(tmp_path)
    victim = sorted((tmp_path / "sop" / "bicycle_final").iterdir())[4]
    victim.write_bytes(victim.read_bytes()[:200])
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "sop", "--workers", "2"]), 1,
                   str(victim), "cannot be read", "--skip_bad")
    assert not split_list_path(tmp_path, "sop", "uncropped").exists()
    assert not list((tmp_path / "sop").glob("uncropped_*")), "the failed generation is cleaned up"
    assert prepare_main(["--data_path", str(tmp_path), "--data_name", "sop", "--skip_bad", "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable images" in err and victim.name in err
    sop = load_split_list(split_list_path(tmp_path, "sop", "uncropped"))
    assert len(sop.splits["train"]) + len(sop.splits["test"]) == 17 and sop.info["skipped"] == 1


def test_box_entirely_outside_the_image(tmp_path, capsys):
    make_cub(tmp_path)
    path = tmp_path / "cub" / "bounding_boxes.txt"
    lines = path.read_text().splitlines()
    lines[0] = "1 500.0 400.0 10.0 10.0"
    path.write_text("\n".join(lines) + "\n")
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "cub", "--crop_type",
                                         "cropped"]), 1, "lies outside the 64x48 image", "images.txt line 1")
    assert prepare_main(["--data_path", str(tmp_path), "--data_name", "cub", "--crop_type", "cropped",
                         "--skip_bad"]) == 0
    assert len(load_split_list(split_list_path(tmp_path, "cub", "cropped")).splits["train"]) == 8


def test_failed_rerun_keeps_the_earlier_preparation(tmp_path, capsys):
    make_car(tmp_path)
    assert prepare_main(["--data_path", str(tmp_path), "--data_name", "car", "--resize", "32"]) == 0
    target = split_list_path(tmp_path, "car", "cropped")
    before = target.read_bytes()
    folders = sorted(p.name for p in (tmp_path / "car").iterdir())
    (tmp_path / "car" / "car_ims" / "000017.jpg").write_bytes(b"\xff\xd8 broken")
    capsys.readouterr()
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "car", "--resize", "64"]), 1,
                   "000017.jpg")
    assert target.read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "car").iterdir()) == folders
    earlier = load_split_list(target)
    assert all(Image.open(p).size == (32, 32) for p in earlier.absolute("test"))


def test_single_image_test_classes_are_counted(tmp_path, capsys):
    make_sop(tmp_path)
    path = tmp_path / "sop" / "Ebay_test.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + lines[4:]) + "\n")  # class 4 keeps one image
    assert prepare_main(["--data_path", str(tmp_path), "--data_name", "sop", "--resize", "0"]) == 0
    assert "1 test classes have fewer than 2 images; their 1 queries cannot be answered" in capsys.readouterr().err


def test_flags_that_do_not_apply_are_usage_errors(tmp_path, capsys):
    make_sop(tmp_path)
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--data_name", "sop", "--crop_type",
                                         "cropped"]), 2, "only applies to car and cub")
    one_line_error(capsys, prepare_main(["--data_path", str(tmp_path), "--imagenet_norm"]), 2, "custom")
    result = run_script("data_utils.py", "--resize", "-3")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1


def test_training_before_preparing_says_how(tmp_path, capsys):
    code = train_main(tiny_args(tmp_path, tmp_path / "out", "--data_name", "cub"))
    one_line_error(capsys, code, 1, "data_utils.py", "--data_name cub")


def test_upsampling_a_small_cache_is_noted(official, tmp_path, capsys):
    from reir.data.sources import load_dataset

    root, _ = official
    load_dataset("sop", root, "uncropped", 512)
    assert "holds images resized to 256x256; --image_size 512 upsamples them" in capsys.readouterr().err
