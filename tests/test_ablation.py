"""ablation.py: the three figures on hand-made databases with known answers, images, refusals."""

import json
import re

import pytest
import torch
from PIL import Image

from conftest import run_script
from handmade import BETTER_ANGLES, TEST_LABELS, WORSE_ANGLES, make_database
from reir.cli.ablation import main
from reir.plots import grids
from reir.retrieval.ablation import compare


def invoke(argv, capsys):
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def pair(tmp_path):
    """Two databases of the same six test images (see tests/handmade.py for the worked answers)."""
    images = tmp_path / "images"
    better = make_database(tmp_path, "better", {"test": (BETTER_ANGLES, TEST_LABELS)}, image_folder=images)
    worse = make_database(tmp_path, "worse", {"test": (WORSE_ANGLES, TEST_LABELS)}, image_folder=images)
    return tmp_path, better, worse


def test_compare_on_counts_worked_by_hand():
    figures = compare(torch.tensor([2, 1, 0, 3]), torch.tensor([1, 1, 2, 0]), 4)
    assert figures["better_ar"] == pytest.approx((2 + 1 + 3) / 4 / 3)
    assert figures["worse_ar"] == pytest.approx((1 + 1 + 2) / 4 / 3)
    assert figures["ge_rate"] == pytest.approx(3 / 4)
    assert (figures["better_wins"], figures["worse_wins"], figures["better_ratio"]) == (2, 1, 2.0)
    none_found = compare(torch.tensor([0, 0]), torch.tensor([0, 0]), 2)
    assert none_found["better_ar"] is None and none_found["better_ratio"] is None and none_found["ge_rate"] == 1.0


def test_figures_and_comparison_images_on_known_databases(pair):
    root, _better, worse = pair
    result = run_script("ablation.py", "--better_data_base", "better_data_base.pth", "--worse_data_base",
                        str(worse), "--retrieval_num", "2", "--save_results", "--output_dir", str(root))
    assert result.returncode == 0, result.stderr
    # better finds 2,2,2,1,1,0 of 2; worse 0,1,1,0,0,0 (query excluded).
    assert "AR@2: better 80.00% | worse 50.00%" in result.stdout
    assert "GE rate: 100.00%" in result.stdout
    assert "better ratio: inf (better wins 5, worse wins 0)" in result.stdout
    folder = root / "results" / "ablation_better_vs_worse_test"
    pictures = sorted(folder.glob("*.png"))
    # what it writes is said before it writes: the count, and a bound on the size the pictures take
    announced = re.search(r"Writing (\d+) comparison images .*at most ([\d.,]+) MiB\) to (.+)", result.stdout)
    assert announced and int(announced.group(1)) == len(pictures) == 5 and announced.group(3) == str(folder)
    assert result.stdout.index("Writing 5") < result.stdout.index("Saved 5")
    assert sum(p.stat().st_size for p in pictures) <= float(announced.group(2).replace(",", "")) * 2 ** 20
    assert [p.name[:5] for p in pictures] == ["00000", "00001", "00002", "00003", "00004"]
    summary = json.loads((folder / "ablation.json").read_text())
    assert (summary["better_wins"], summary["worse_wins"], summary["better_ratio"]) == (5, 0, None)

    picture = Image.open(pictures[0])  # query 0 (A at 0 deg): better gets 5, 10 (A, A); worse 40, 300 (B, C)
    assert picture.size == grids.grid_size(2, 3, title=True)
    x, y = grids.cell_origin(0, 0, title=True)
    assert picture.getpixel((x + 1, y + 1)) == grids.BLUE
    for row, colours in ((0, [grids.GREEN, grids.GREEN]), (1, [grids.RED, grids.RED])):
        for column, colour in enumerate(colours, start=1):
            x, y = grids.cell_origin(row, column, title=True)
            assert picture.getpixel((x + 1, y + 1)) == colour
    x, y = grids.cell_origin(1, 0, title=True)
    assert picture.getpixel((x + 1, y + 1)) == grids.BACKGROUND  # no query repeated under it


def test_swapped_roles_give_the_mirror_figures(pair, capsys):
    root, better, worse = pair
    code, out, err = invoke(["--better_data_base", str(worse), "--worse_data_base", str(better),
                             "--retrieval_num", "2", "--output_dir", str(root), "--save_results"], capsys)
    assert code == 0, err
    assert "GE rate: 16.67%" in out
    assert "better ratio: 0.0000 (better wins 0, worse wins 5)" in out
    assert "Saved 0 comparison images" in out


def test_train_split_and_no_correct_result_at_all(tmp_path, capsys):
    images = tmp_path / "images"
    labels = ["p", "q", "r"]  # every class once: nothing can be found
    a = make_database(tmp_path, "a", {"train": ([0, 10, 20], labels), "test": ([0], ["z"])}, image_folder=images)
    b = make_database(tmp_path, "b", {"train": ([0, 90, 180], labels), "test": ([0], ["z"])}, image_folder=images)
    code, out, err = invoke(["--better_data_base", str(a), "--worse_data_base", str(b), "--data_type", "train"],
                            capsys)
    assert code == 0, err
    assert "3 train queries against the train split, K = 2" in out
    assert "AR@2: better n/a" in out and "better ratio: undefined (better wins 0, worse wins 0)" in out


def test_mismatched_databases_are_refused(pair, tmp_path_factory, capsys):
    root, better, worse = pair
    other = tmp_path_factory.mktemp("other")
    other_data = make_database(other, "dn", {"test": (WORSE_ANGLES, TEST_LABELS)}, info={"data_name": "cub"},
                               image_folder=root / "images")
    other_crop = make_database(other, "cr", {"test": (WORSE_ANGLES, TEST_LABELS)}, info={"crop_type": "cropped"},
                               image_folder=root / "images")
    fewer = make_database(other, "few", {"test": (WORSE_ANGLES[:5], TEST_LABELS[:5])}, image_folder=root / "images")
    relabelled = make_database(other, "rl", {"test": (WORSE_ANGLES, list(reversed(TEST_LABELS)))},
                               image_folder=root / "images")
    no_train = ["--data_type", "train"]
    cases = [([other_crop], "differ in crop_type"),
             ([fewer], "different test image lists"), ([relabelled], "different test image lists"),
             ([worse, *no_train], "has no train split")]
    before = sorted(root.rglob("*"))
    for (db, *extra), message in cases:
        code, _out, err = invoke(["--better_data_base", str(better), "--worse_data_base", str(db), "--save_results",
                                 "--output_dir", str(root), *extra], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, err
    assert sorted(root.rglob("*")) == before
    # the same images under another dataset name (a folder embedded by models of two datasets) compare
    code, out, err = invoke(["--better_data_base", str(better), "--worse_data_base", str(other_data),
                             "--output_dir", str(other)], capsys)
    assert code == 0 and "GE rate: 100.00%" in out, err
    code, out, err = invoke(["--better_data_base", str(better), "--retrieval_num", "-1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _out, err = invoke(["--output_dir", str(root)], capsys)  # the original's defaults, not trained here
    assert code == 1 and "car_uncropped_fixed_unrandom_layer1_resnet18_48_12_data_base.pth not found" in err


def test_same_images_under_another_data_root_compare_equal(pair, tmp_path_factory, capsys):
    _root, better, _ = pair
    moved = tmp_path_factory.mktemp("moved")
    copy = make_database(moved, "copy", {"test": (WORSE_ANGLES, TEST_LABELS)}, image_folder=moved / "elsewhere")
    code, out, err = invoke(["--better_data_base", str(better), "--worse_data_base", str(copy),
                             "--retrieval_num", "2"], capsys)
    assert code == 0, err
    assert "better wins 5, worse wins 0" in out


def test_the_same_database_twice_is_refused_and_identical_embeddings_are_named(pair, tmp_path_factory, capsys):
    root, better, worse = pair
    code, out, err = invoke(["--better_data_base", str(better), "--worse_data_base", str(better)], capsys)
    assert code == 2 and "are the same file" in err and len(err.strip().splitlines()) == 1 and not out
    copy = make_database(tmp_path_factory.mktemp("copy"), "copy", {"test": (BETTER_ANGLES, TEST_LABELS)},
                         image_folder=root / "images")
    code, out, err = invoke(["--better_data_base", str(better), "--worse_data_base", str(copy)], capsys)
    assert code == 0 and "identical embeddings" in err and "GE rate: 100.00%" in out
    code, out, err = invoke(["--better_data_base", str(better), "--worse_data_base", str(worse)], capsys)
    assert code == 0 and "identical" not in err
