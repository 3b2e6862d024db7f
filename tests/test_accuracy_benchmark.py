"""benchmarks/accuracy.py on a tiny setting: every method runs and the tables are complete."""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import struct

import numpy as np
import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", REPO / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--train_classes", "4", "--test_classes", "4", "--image_size", "16", "--epochs", "1",
        "--ensemble_size", "3", "--batch_size", "16"]


def table_rows(markdown) -> dict[str, dict[str, list[str]]]:
    """Rows of each ``### <dataset>, <n> epochs`` section, by method."""
    sections, current = {}, None
    for line in markdown.read_text().splitlines():
        if line.startswith("### "):
            current = sections.setdefault(line[4:], {})
        elif line.startswith("| ") and current is not None:
            cells = [cell.strip() for cell in line.split("|")[1:-1]]
            current[cells[0]] = cells[1:]
    return sections


def test_every_method_yields_a_complete_row(accuracy, glyphs_root, tmp_path):
    markdown, plot = tmp_path / "tables.md", tmp_path / "ensemble.png"
    methods = [m for m in accuracy.METHODS if m != accuracy.PRETRAINED]  # needs --weights: its own test
    assert accuracy.main(["--datasets", "glyphs", "--glyph_from", "U+0000", "--data_path", str(glyphs_root), *TINY,
                          "--seeds", "0",
                          "--methods", ",".join(methods), "--markdown", str(markdown),
                          "--plot", str(plot)]) == 0
    sections = table_rows(markdown)
    assert set(sections) == {"glyphs, 1 epochs", "glyphs: R@1 against training compute (every budget)"}
    rows = sections["glyphs, 1 epochs"]
    trained = [m for m in accuracy.METHODS if m not in (*accuracy.BASELINES, accuracy.BEST_BRANCH)]
    for method in methods:
        cells = rows[method]
        assert len(cells) == 9 and 0 <= float(cells[0]) <= 100 and 0 <= float(cells[1]) <= 100
    for method in trained:  # training's CPU seconds, a part of the run's, its images per CPU second, the rest
        _, _, last, seeds, _, cpu, training, speed, other = rows[method]
        assert last and seeds == "1" and 0 < float(training) <= float(cpu) and float(speed) > 0
        assert float(other) > 0 and abs(float(training) + float(other) - float(cpu)) <= 1  # each rounded
    compute = sections["glyphs: R@1 against training compute (every budget)"]
    assert set(compute) - {"method"} == set(trained)
    costs = [float(cells[1]) for method, cells in compute.items() if method != "method"]
    assert costs == sorted(costs)  # cheapest training first
    assert [name for name in rows if name.startswith("first")] == ["first 1", "first 2", "first 3"]
    assert "each branch alone (min / mean / max)" in rows
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_seeds_give_mean_and_spread_and_finished_runs_are_skipped(accuracy, tmp_path, capsys):
    from reir.data.fonts import prepare_fonts

    prepare_fonts(tmp_path / "data", limit=20)
    results, markdown = tmp_path / "runs.jsonl", tmp_path / "tables.md"
    argv = ["--datasets", "fonts", "--data_path", str(tmp_path / "data"), *TINY, "--seeds", "0,1",
            "--methods", "raw pixels,untrained network,softmax", "--results", str(results), "--markdown", str(markdown)]
    assert accuracy.main(argv) == 0
    records = accuracy.load_results(results)
    assert sorted((r["method"], r["seed"]) for r in records) == [
        ("raw pixels", 0), ("softmax", 0), ("softmax", 1), ("untrained network", 0), ("untrained network", 1)]
    softmax = [100 * r["metrics"]["recall@1"] for r in records if r["method"] == "softmax"]
    expected = f"{np.mean(softmax):.1f} ± {np.std(softmax, ddof=1):.1f}"
    assert table_rows(markdown)["fonts, 1 epochs"]["softmax"][0] == expected
    capsys.readouterr()
    assert accuracy.main(argv) == 0
    assert ", 0 runs" in capsys.readouterr().out
    assert len(accuracy.load_results(results)) == len(records)


def test_weights_start_every_method_from_that_backbone_beside_its_own_features(accuracy, tmp_path):
    import torch
    import torchvision

    from reir.data.custom import load_custom
    from reir.data.fonts import prepare_fonts
    from reir.errors import ReirError
    from reir.retrieval.baselines import label_ids, network_features

    prepare_fonts(tmp_path / "data", limit=20)
    torch.manual_seed(0)
    backbone = torchvision.models.resnet18()
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    common = ["--datasets", "fonts", "--data_path", str(tmp_path / "data"), *TINY, "--seeds", "0,1"]
    results, work = tmp_path / "runs.jsonl", tmp_path / "work"
    assert accuracy.main([*common, "--methods", "pretrained features,REIR,softmax", "--weights", str(weights),
                          "--results", str(results), "--work", str(work)]) == 0
    records = accuracy.load_results(results)
    assert sorted((r["method"], r["seed"]) for r in records) == [
        ("REIR", 0), ("REIR", 1), ("pretrained features", 0), ("softmax", 0), ("softmax", 1)]
    assert all("resnet18 from backbone.pth (SHA-256 " in r["setting"] and "original recipe" in r["setting"]
               for r in records)
    # the row is the file's backbone, its classifier removed: the same metrics computed here
    backbone.fc = torch.nn.Identity()
    split_list = load_custom(work / "fonts" / "fonts.csv", "uncropped")
    pooled = torch.nn.Sequential(backbone, torch.nn.Unflatten(1, (1, 512)))  # [N, 1 "branch", 512]
    expected = accuracy.scores(network_features(pooled, split_list, "test", 16), label_ids(split_list, "test"))
    (pretrained,) = [r for r in records if r["method"] == "pretrained features"]
    assert pretrained["metrics"] == pytest.approx(expected)
    # REIR and the peers are built from the file: one that is not a resnet18 stops both
    other = tmp_path / "other.pth"
    torch.save(torchvision.models.resnet34().state_dict(), other)
    with pytest.raises(SystemExit, match="not a resnet18 state dict"):
        accuracy.main([*common, "--methods", "REIR", "--weights", str(other)])
    with pytest.raises(ReirError, match="not a resnet18 state dict"):
        accuracy.main([*common, "--methods", "softmax", "--weights", str(other)])
    with pytest.raises(SystemExit, match="needs --weights"):
        accuracy.main([*common, "--methods", "pretrained features"])


def test_best_reir_row_is_chosen_among_rows_with_the_peers_recipe_and_batch(accuracy):
    """Every REIR row is checked against ``reir train``'s own parser: the row's flags after the grid's ones
    leave the recipe (resolved for the weights) and the batch the peers train with, or the row is left out."""
    from reir.cli.train import get_args_parser as train_parser
    from reir.training.recipe import recipe_for

    seen = set()
    for weights in ("none", "backbone.safetensors"):
        for recipe in ("auto", "original", "scratch"):
            args = accuracy.get_args_parser().parse_args(["--weights", weights, "--recipe", recipe])
            args.train_class_count, args.meta_class_size = 100, 12
            for method in accuracy.REIR_VARIANTS:
                parsed = train_parser().parse_args(["--weights", weights, "--recipe", recipe, "--batch_size",
                                                    str(args.batch_size), *accuracy.reir_options(method, args)])
                same = (recipe_for(parsed.recipe, weights).name == recipe_for(recipe, weights).name
                        and parsed.batch_size == args.batch_size)
                assert accuracy.keeps_grid_budget(method, args) == same, (method, weights, recipe)
                seen.add((method, same))
    # the rule could fail both ways: some rows are kept, and the recipe and batch rows are left out somewhere
    assert {m for m, same in seen if not same} >= {"REIR original recipe batch 10", "REIR scratch recipe",
                                                   "REIR original recipe"}
    assert ("REIR", True) in seen and ("REIR", False) not in seen


def write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + b"".join(struct.pack(">I", n) for n in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_files_become_class_folders(accuracy, tmp_path, monkeypatch):
    source = tmp_path / "fashion-mnist"
    source.mkdir()
    labels = np.repeat(np.arange(10), 3)
    for prefix in ("train", "t10k"):
        write_idx(source / f"{prefix}-images-idx3-ubyte.gz", np.random.default_rng(0).integers(0, 255, (30, 28, 28)))
        write_idx(source / f"{prefix}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setattr(accuracy, "FASHION_MNIST", source)
    root = accuracy.fashion_source(tmp_path / "work", None, argparse.Namespace(train_images=2, test_images=1))
    assert sorted(p.name for p in (root / "train").iterdir()) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in (root / "test").iterdir()) == ["5", "6", "7", "8", "9"]
    assert all(len(list(folder.iterdir())) == 2 for folder in (root / "train").iterdir())
    assert all(len(list(folder.iterdir())) == 1 for folder in (root / "test").iterdir())


def test_missing_fashion_mnist_says_how_to_install(accuracy, tmp_path, monkeypatch):
    monkeypatch.setattr(accuracy, "FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(SystemExit, match="apt-get install -y dataset-fashion-mnist"):
        accuracy.fashion_source(tmp_path, None, argparse.Namespace(train_images=1, test_images=1))
