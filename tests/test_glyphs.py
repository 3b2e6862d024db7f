"""The embedded glyphs dataset, the training recipes and the demo, on a few characters."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reir.cli import demo
from reir.cli.prepare import main as prepare_main
from reir.cli.train import main as train_main
from reir.data import glyphs
from reir.data.splits import load_split_list, split_list_path
from reir.retrieval.database import load_database
from reir.training import recipe

CHARACTERS = 12  # as conftest's glyphs_root


def digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted((root / "glyphs").rglob("*")) if p.is_file()}


def test_generation_is_deterministic(glyphs_root, tmp_path):
    glyphs.prepare_glyphs(tmp_path, limit=CHARACTERS)
    assert digest(tmp_path) == digest(glyphs_root)


def test_classes_are_disjoint_characters_each_drawn_by_many_fonts(glyphs_root):
    split_list = load_split_list(split_list_path(glyphs_root, "glyphs", "uncropped"))
    train, test = split_list.splits["train"], split_list.splits["test"]
    assert train.classes and test.classes and not set(train.classes) & set(test.classes)
    for split in (train, test):
        for name in split.classes:
            assert split.labels.count(name) >= glyphs.MIN_FONTS
    for path in split_list.absolute("train") + split_list.absolute("test"):
        pixels = np.asarray(Image.open(path))
        assert pixels.shape == (glyphs.IMAGE_SIZE, glyphs.IMAGE_SIZE) and pixels.max() > 0


def test_character_maps_leave_room_for_500_classes_a_side():
    drawn = glyphs.font_characters(glyphs.font_folder())
    train, test = glyphs.split_classes(glyphs.candidate_characters(drawn))
    assert min(len(train), len(test)) >= 500 and not set(train) & set(test)
    # Computer Modern's TeX-encoded maps contribute letters and digits only.
    assert all(drawn[name] <= glyphs.ALPHANUMERIC for name in glyphs.COMPUTER_MODERN)


def test_a_class_subset_is_seeded_and_keeps_the_split_of_every_class(glyphs_root, tmp_path):
    split_list = load_split_list(split_list_path(glyphs_root, "glyphs", "uncropped"))
    first = glyphs.write_subset_csv(split_list, tmp_path / "a.csv", 3, 2, seed=1)
    again = glyphs.write_subset_csv(split_list, tmp_path / "b.csv", 3, 2, seed=1)
    assert first.read_text() == again.read_text()
    rows = [line.split(",") for line in first.read_text().splitlines()[1:]]
    chosen = {split: {label for _, label, s in rows if s == split} for split in ("train", "test")}
    assert len(chosen["train"]) == 3 and len(chosen["test"]) == 2
    assert chosen["train"] <= set(split_list.splits["train"].classes)
    assert chosen["test"] <= set(split_list.splits["test"].classes)
    lowest = glyphs.write_subset_csv(split_list, tmp_path / "c.csv", 2, 2, seed=None)
    rows = [line.split(",") for line in lowest.read_text().splitlines()[1:]]
    for split in ("train", "test"):
        points = sorted(int(name[2:], 16) for name in split_list.splits[split].classes)
        assert {int(label[2:], 16) for _, label, s in rows if s == split} == set(points[:2])


def test_a_subset_of_a_relative_data_path_loads_from_another_folder(glyphs_root, tmp_path, monkeypatch):
    """The demo writes its CSV under the output folder while the data lives under ./data."""
    from reir.data.custom import load_custom

    monkeypatch.chdir(glyphs_root.parent)
    split_list = load_split_list(split_list_path(Path(glyphs_root.name), "glyphs", "uncropped"))
    source = glyphs.write_subset_csv(split_list, tmp_path / "out" / "subset.csv", 2, 2, seed=None)
    loaded = load_custom(source, "uncropped")
    assert len(loaded.splits["train"].classes) == 2 and len(loaded.splits["test"].classes) == 2
    assert all(Path(p).is_file() for p in loaded.absolute("train") + loaded.absolute("test"))


def test_blank_renderings_are_refused():
    font = glyphs.ImageFont.truetype(str(glyphs.font_folder() / glyphs.FONTS[0]), glyphs.FONT_SIZE)
    assert glyphs.render(font, ord(" ")) is None
    assert glyphs.render(font, ord("A")).max() > 0


def test_prepare_command_reports_the_dataset(glyphs_root, capsys):
    assert prepare_main(["--data_name", "glyphs", "--data_path", str(glyphs_root)]) == 0
    assert "glyphs ready" in capsys.readouterr().out


def test_missing_fonts_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(glyphs, "font_folder", lambda: tmp_path / "no-fonts")
    assert prepare_main(["--data_name", "glyphs", "--data_path", str(tmp_path / "data")]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "matplotlib" in error
    assert not split_list_path(tmp_path / "data", "glyphs", "uncropped").exists()


def test_a_damaged_split_list_is_reported_not_replaced(glyphs_root, tmp_path, capsys):
    data = tmp_path / "data"
    (data / "glyphs").mkdir(parents=True)
    damaged = split_list_path(data, "glyphs", "uncropped")
    damaged.write_text("{not json")
    # A small model: the seed's default may not fit the machine's free memory, which is checked first.
    assert train_main(["--data_name", "glyphs", "--data_path", str(data), "--output_dir", str(tmp_path / "out"),
                       "--weights", "none", "--device", "cpu", "--ensemble_size", "3", "--image_size", "32"]) == 1
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and str(damaged) in error
    assert damaged.read_text() == "{not json"


def test_recipe_follows_the_weights_and_keeps_the_original_with_imagenet():
    assert recipe.recipe_for("auto", "imagenet") is recipe.ORIGINAL
    assert recipe.recipe_for("auto", "weights.safetensors") is recipe.ORIGINAL
    assert recipe.recipe_for("auto", "none") is recipe.SCRATCH
    assert recipe.recipe_for("original", "none") is recipe.ORIGINAL
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = recipe.ORIGINAL.optimizer(model.parameters(), 10)
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == 1e-4
    assert isinstance(scheduler, torch.optim.lr_scheduler.MultiStepLR) and sorted(scheduler.milestones) == [5, 7]


def test_scratch_recipe_decays_its_rate_over_the_epochs():
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = recipe.SCRATCH.optimizer(model.parameters(), 4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[0] == recipe.SCRATCH.learning_rate and rates == sorted(rates, reverse=True) and rates[-1] > 0
    assert type(optimizer) is torch.optim.AdamW and optimizer.param_groups[0]["weight_decay"] == 0.05


def test_demo_prints_learned_and_baseline_rows(glyphs_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "CONFIG", demo.ModelConfig("resnet18", "layer4", ensemble_size=3, meta_class_size=2))
    monkeypatch.setattr(demo, "IMAGE_SIZE", 16)
    assert demo.main(["--data_path", str(glyphs_root), "--output_dir", str(tmp_path), "--num_epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "scratch recipe" in out
    # outputs named after the glyphs they were trained on, not custom_uncropped_...
    databases = [p.name for p in (tmp_path / "results").glob("*_data_base.safetensors")]
    assert len(databases) == 1 and databases[0].startswith("glyphs_uncropped_fixed_"), databases
    assert load_database(tmp_path / "results" / databases[0]).info["data_name"] == "glyphs"
    # each stage says what it does and how long it takes before it starts
    stages = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in stages] == ["[1/3] dataset", "[2/3] training", "[3/3] baselines"]
    assert all(re.search(r"about \d+ s on an idle 2-core CPU", line) for line in stages)
    assert out.index("[2/3] training") < out.index("Train 1/1") < out.index("[3/3] baselines")
    table = [line for line in out.splitlines() if line.startswith("| ") and "embedding" not in line]
    assert [line.split("|")[1].strip().split(" (")[0].split(",")[0] for line in table] == [
        "REIR", "raw pixels", "same network"]
    assert all(len(line.split("|")) == 8 for line in table)
