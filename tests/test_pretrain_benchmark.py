"""benchmarks/pretrain.py's guarantees that need no font package: no pretraining class is a target's,
augmented images stay images, and only the script's own output is ever replaced."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from conftest import REPO


@pytest.fixture(scope="module")
def pretrain():
    spec = importlib.util.spec_from_file_location("pretrain_benchmark", REPO / "benchmarks" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def targets(pretrain):
    return pretrain.target_classes()


def test_the_targets_classes_come_from_their_own_definitions(pretrain, targets):
    from reir.data.fonts import prepare_fonts
    from reir.data.glyphs import prepare_glyphs

    assert ord("A") in targets["fonts"] and ord("7") in targets["digits"]
    assert targets["glyphs"] | targets["fonts"] <= pretrain.target_font_characters()
    # a real target's classes (the first glyph and font characters) are among them
    assert {int(name[2:], 16) for name in classes_of(prepare_glyphs)} <= targets["glyphs"]
    assert {int(name[2:], 16) for name in classes_of(prepare_fonts)} <= targets["fonts"]


def classes_of(prepare) -> set[str]:
    """The class names of a small copy of an embedded target."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        split_list = prepare(folder, limit=12)
        return {label for split in split_list.splits.values() for label in split.labels}


# Target classes themselves, and characters no target font maps that decompose into target characters
# (fullwidth A, the kg sign, parenthesised one).
@pytest.mark.parametrize("character", ["Ā", "ǆ", "\U0001d400", "\uff21", "㎏", "⑴"])  # bold and full-width A
def test_a_target_character_or_one_decomposing_into_one_stops_the_run(pretrain, targets, character):
    cuneiform = [0x12000, 0x12001]
    pretrain.check_disjoint(cuneiform, targets)  # the control: disjoint classes pass
    with pytest.raises(SystemExit, match="pretraining classes are classes of the glyphs target"):
        pretrain.check_disjoint([*cuneiform, ord(character)], targets)


def test_augmented_images_keep_their_shape_and_range_and_differ(pretrain):
    generator = torch.Generator().manual_seed(0)
    images = torch.zeros(64, 1, 32, 32)
    images[:, :, 8:24, 14:18] = 1.0
    out = pretrain.augment(images.clone(), generator)
    assert out.shape == images.shape and out.min() >= 0 and out.max() <= 1
    assert (out.sum((1, 2, 3)) > 0).all(), "every image keeps ink"
    assert len({round(float(v), 3) for v in out.sum((1, 2, 3))}) > 32, "each image its own transform"


def test_only_a_file_the_script_wrote_is_replaced(pretrain, tmp_path):
    from reir.fileio import save_tensors

    pretrain.check_output(tmp_path / "absent.safetensors")
    mine = save_tensors(tmp_path / "mine.safetensors", {"w": torch.zeros(1)}, {"format": pretrain.FORMAT})
    pretrain.check_output(mine)
    theirs = tmp_path / "theirs.safetensors"
    theirs.write_bytes(b"someone's file")
    with pytest.raises(SystemExit, match=r"was not written by benchmarks/pretrain\.py"):
        pretrain.check_output(theirs)
    assert theirs.read_bytes() == b"someone's file"
