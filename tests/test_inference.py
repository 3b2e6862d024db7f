"""inference.py / reir search: rankings, exclusion of the query, the grid, files, errors, end to end."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import run_reir, run_script, tiny_args
from handmade import make_database
from reir.cli.search import main
from reir.plots import grids
from reir.retrieval.database import load_database
from reir.retrieval.lookup import rank

TEST_LABELS = ["a", "b", "c", "a", "b", "c", "a", "b", "c", "a"]
TRAIN_LABELS = ["x", "y", "x", "y", "x", "y"]


def invoke(argv, capsys):
    """Run inference in-process as a user would: exit code, stdout, stderr."""
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def random_features(n, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, 3, 4, generator=generator), dim=-1)


def brute_force(query, gallery, exclude=None):
    """Mean over branches of the per-branch cosine, fully sorted."""
    similarity = torch.einsum("ec,nec->n", query, gallery) / query.shape[0]
    if exclude is not None:
        similarity[exclude] = -float("inf")
    order = similarity.argsort(descending=True)
    return order.tolist(), similarity[order].tolist()


@pytest.fixture
def toy(tmp_path):
    features = {"test": random_features(len(TEST_LABELS), 1), "train": random_features(len(TRAIN_LABELS), 2)}
    path = make_database(tmp_path, "toy", {"test": (features["test"], TEST_LABELS),
                                           "train": (features["train"], TRAIN_LABELS)})
    return tmp_path, path, load_database(path)


def border_colour(image, row, column, title=False):
    x, y = grids.cell_origin(row, column, title)
    return image.getpixel((x + grids.BORDER // 2, y + grids.BORDER // 2))


def test_rank_matches_brute_force_and_never_returns_the_excluded_row():
    gallery = random_features(50, 3)
    for exclude in (None, 0, 17, 49):
        found = rank(gallery[17:18], gallery, 10, exclude).row(0)
        indices, scores = [i for i, _ in found], [s for _, s in found]
        order, expected = brute_force(gallery[17], gallery, exclude)
        assert indices == order[:10]
        assert scores == pytest.approx(expected[:10], abs=1e-5)
        assert exclude not in indices
    assert [i for i, _ in rank(gallery[:1], gallery, 100, 0).row(0)] == brute_force(gallery[0], gallery, 0)[0][:49]


def test_query_in_database_excludes_itself_draws_grid_and_writes_files(toy, capsys):
    root, path, db = toy
    query = db.paths("test")[3]
    code, out, err = invoke(["--query_img_name", query, "--data_base", str(path), "--output_dir", str(root),
                             "--retrieval_num", "4"], capsys)
    assert code == 0, err
    folder = root / "results" / "test_003"
    report = json.loads((folder / "results.json").read_text())
    order, expected = brute_force(db.features["test"][3], db.features["test"], exclude=3)
    assert [r["path"] for r in report["results"]] == [db.paths("test")[i] for i in order[:4]]
    assert [r["score"] for r in report["results"]] == pytest.approx(expected[:4], abs=1e-5)
    assert query not in [r["path"] for r in report["results"]]
    assert report["query"] == {"path": query, "label": "a", "in_database": True, "split": "test"}
    assert [r["correct"] for r in report["results"]] == [TEST_LABELS[i] == "a" for i in order[:4]]
    marks = [line.rsplit(None, 1)[1] for line in out.splitlines()[1:5]]
    assert marks == ["correct" if r["correct"] else "wrong" for r in report["results"]]

    grid = Image.open(folder / "grid.png")
    assert grid.size == grids.grid_size(1, 5)
    assert border_colour(grid, 0, 0) == grids.BLUE
    for column, result in enumerate(report["results"], start=1):
        assert border_colour(grid, 0, column) == (grids.GREEN if result["correct"] else grids.RED)
    assert (folder / "query_img.jpg").is_file()
    for r in report["results"]:
        assert (folder / f"retrieval_img_{r['rank']}_{r['score']:.4f}_{r['correct']}.jpg").is_file()


def test_original_name_train_split_and_json_on_stdout(toy, capsys):
    root, _, db = toy
    code, out, err = invoke(["--query_img_name", db.paths("test")[0], "--data_base", "toy_data_base.pth",
                             "--output_dir", str(root), "--data_type", "train", "--retrieval_num", "20", "--json"],
                            capsys)
    assert code == 0, err
    report = json.loads(out)
    order, _expected = brute_force(db.features["test"][0], db.features["train"])
    assert [r["path"] for r in report["results"]] == [db.paths("train")[i] for i in order]  # K clipped to 6
    assert report["split"] == "train" and report["json"] is None
    assert not any(r["correct"] for r in report["results"])  # train classes differ from test classes
    assert not (root / "results" / "test_000" / "results.json").exists()
    assert Image.open(root / "results" / "test_000" / "grid.png").size == grids.grid_size(1, 7)
    again, out, err = invoke(["--query_img_name", db.paths("test")[0], "--data_base", "toy_data_base.pth",
                              "--output_dir", str(root), "--data_type", "train", "--retrieval_num", "20", "--json"],
                             capsys)
    assert again == 0, err
    # regression: with no results.json, a --json rerun took its own folder for another query's and wrote _2
    assert sorted(p.name for p in (root / "results").iterdir() if p.is_dir()) == ["test_000"]


def test_rerun_replaces_per_image_files_and_long_lists_wrap(toy, capsys):
    root, path, db = toy
    base = ["--query_img_name", db.paths("test")[5], "--data_base", str(path), "--output_dir", str(root)]
    assert invoke([*base, "--retrieval_num", "9"], capsys)[0] == 0
    folder = root / "results" / "test_005"
    assert len(list(folder.glob("retrieval_img_*.jpg"))) == 9
    assert Image.open(folder / "grid.png").size == grids.grid_size(2, 9)  # query + 9 results in rows of 9
    assert invoke([*base, "--retrieval_num", "2"], capsys)[0] == 0
    assert len(list(folder.glob("retrieval_img_*.jpg"))) == 2


def test_missing_file_with_a_database_image_name_uses_that_image(toy, capsys, monkeypatch):
    root, path, db = toy
    monkeypatch.chdir(root)
    code, out, err = invoke(["--query_img_name", "data/car/uncropped/test_007.png", "--data_base", str(path),
                             "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["query"]["path"] == db.paths("test")[7]


def test_error_paths_are_one_line_and_write_nothing(toy, capsys, tmp_path_factory):
    root, path, _db = toy
    outside = tmp_path_factory.mktemp("elsewhere") / "photo.png"
    Image.new("RGB", (5, 5)).save(outside)
    pickle_db = root / "evil_data_base.pth"
    torch.save({"test_features": torch.zeros(2)}, pickle_db)
    only_test = make_database(root / "only_test", "t", {"test": ([0, 90], ["a", "b"])})
    moved = make_database(root / "moved", "m", {"test": ([0, 90], ["a", "b"])},
                          info={"model_file": str(root / "gone" / "m_model.safetensors"), "image_size": 32})
    cases = [
        (["--data_base", "missing.pth"], 1, "not found"),
        (["--data_base", str(pickle_db)], 1, "lacks test_images"),  # read as the original's, refused
        (["--data_base", str(path), "--query_img_name", "nowhere/zzz.png"], 1, "neither an image file"),
        (["--data_base", str(path), "--query_img_name", str(outside)], 1, "records no model file"),
        (["--data_base", str(moved), "--query_img_name", str(outside)], 1, "m_model.safetensors of database"),
        (["--data_base", str(path), "--retrieval_num", "0"], 2, "must be >= 1"),
        (["--data_base", str(path), "--data_type", "val"], 2, "invalid choice"),
        (["--data_base", str(only_test), "--query_img_name", str(root / "only_test/images/test/test_000.png"),
          "--data_type", "train"], 1, "has no train split"),
    ]
    before = sorted(p for p in root.rglob("*"))
    for argv, expected_code, message in cases:
        code, _out, err = invoke([*argv, "--output_dir", str(root)], capsys)
        assert code == expected_code, (argv, err)
        assert len(err.strip().splitlines()) == 1 and message in err, (argv, err)
        assert "Traceback" not in err
    assert sorted(p for p in root.rglob("*")) == before


@pytest.fixture(scope="module")
def trained(small_digits_root, tmp_path_factory):
    """A real tiny database, trained for one epoch through train.py (16 px, branches = classifiers: fast)."""
    from reir.cli.train import main as train_main

    output = tmp_path_factory.mktemp("trained")
    assert train_main(tiny_args(small_digits_root, output, "--image_size", "16", "--share_type", "layer4")) == 0
    return output


def test_training_writes_the_statistics_plot(trained):
    plots = list((trained / "statistics").glob("*_results.png"))
    assert len(plots) == 1 and Image.open(plots[0]).format == "PNG"


def test_end_to_end_in_database_and_outside_image(trained, tmp_path):
    name = "digits_uncropped_fixed_unrandom_layer4_resnet18_3_2_data_base.pth"  # the original's naming
    db = load_database(next((trained / "results").glob("*_data_base.safetensors")))
    query = db.paths("test")[10]
    result = run_script("inference.py", "--query_img_name", query, "--data_base", name,
                        "--output_dir", str(trained), "--retrieval_num", "5")
    assert result.returncode == 0, result.stderr
    stem = query.rsplit("/", 1)[1].rsplit(".", 1)[0]
    folder = trained / "results" / stem
    inside = json.loads((folder / "results.json").read_text())
    assert Image.open(folder / "grid.png").size == grids.grid_size(1, 6)

    copy = tmp_path / "my_digit.png"
    shutil.copyfile(query, copy)  # same pixels, a path the database does not know
    result = run_reir("search", "--query_img_name", str(copy), "--data_base", name,
                      "--output_dir", str(trained), "--retrieval_num", "6", "--json",
                      "--query_label", inside["query"]["label"])
    assert result.returncode == 0, result.stderr
    outside = json.loads(result.stdout)
    assert outside["query"]["in_database"] is False
    assert outside["results"][0]["path"] == query and outside["results"][0]["score"] > 0.999
    # The recomputed embedding ranks the rest like the stored one (order may differ only within ties).
    assert [r["score"] for r in outside["results"][1:]] == pytest.approx(
        [r["score"] for r in inside["results"]], abs=1e-4)
    assert all(r["correct"] == (r["label"] == inside["query"]["label"]) for r in outside["results"])
    assert (trained / "results" / "my_digit" / "grid.png").is_file()


def test_queries_of_one_file_name_keep_their_own_folders(tmp_path):
    """Every glyph is <character>/DejaVuSans.png: a second character's query must not overwrite the first's."""
    from reir.cli.search import query_folder

    results = tmp_path / "results"
    first = query_folder(results, "data/glyphs/images/U+0041/DejaVuSans.png")
    assert first == results / "DejaVuSans"
    first.mkdir(parents=True)
    (first / "query.json").write_text(json.dumps({"format": grids.SEARCH_FORMAT,
                                                   "query": "data/glyphs/images/U+0041/DejaVuSans.png"}))
    assert query_folder(results, "data/glyphs/images/U+0041/DejaVuSans.png") == first  # a rerun replaces its own
    second = query_folder(results, "data/glyphs/images/U+0391/DejaVuSans.png")
    assert second == results / "DejaVuSans_2"
    second.mkdir()
    (second / "query.json").write_text("not json")  # unreadable: never taken as this query's
    assert query_folder(results, "data/glyphs/images/U+0410/DejaVuSans.png") == results / "DejaVuSans_3"


def test_grid_captions_hold_the_whole_label_and_a_code_points_character():
    font = grids.caption_font()
    caption = grids.result_caption({"rank": 1, "score": 1.0, "label": "U+0391"})
    assert caption == "1: 1.0000\nU+0391 \u0391"
    long_label = "a class name longer than one line"
    lines = grids.caption_lines(grids.result_caption({"rank": 2, "score": 0.5, "label": long_label}), font)
    assert len(lines) == 3 and lines[0] == "2: 0.5000" and " ".join(lines[1:]) == long_label  # wrapped, not cut
    assert all(font.getlength(line) <= grids.TILE for line in lines)
    beyond = grids.caption_lines("1: 0.5\n" + long_label * 3, font)  # past the strip's lines: an ellipsis says so
    assert len(beyond) == grids.CAPTION_LINES and beyond[-1].endswith("…")
    assert grids.shown_label("U+D800") == "U+D800" and grids.shown_label("cat") == "cat"
