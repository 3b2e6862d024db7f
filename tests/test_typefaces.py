"""The many-class unseen-typeface set (reir/data/typefaces.py), built with matplotlib's STIX fonts standing in
for Debian's Liberation fonts, so it runs wherever REIR installs: classes and typefaces split, look-alike
and blank characters left out, the same files on every build, and a one-line error without the fonts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from conftest import REPO
from reir.cli.prepare import main as prepare_main
from reir.data import typefaces
from reir.data.custom import load_custom
from reir.data.glyphs import STIX, font_folder
from reir.data.splits import split_list_path
from reir.data.typefaces import LIBERATION, FontSet, matplotlib_dejavu, prepare_typefaces
from reir.errors import ReirError

SIDES = ("train", "test")


@pytest.fixture(scope="module")
def stix() -> FontSet:
    return FontSet(font_folder(), tuple(STIX), "pip install --force-reinstall matplotlib")


def not_installed(folder: Path) -> FontSet:
    """The Liberation fonts, looked for where they are not."""
    return FontSet(folder / "no-fonts", LIBERATION.names, LIBERATION.install)


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_classes_and_typefaces_are_split_and_two_builds_write_the_same_files(tmp_path, stix):
    split_list = prepare_typefaces(tmp_path / "a", limit=40, test=stix)
    train, test = split_list.splits["train"], split_list.splits["test"]
    assert train.classes and test.classes and not set(train.classes) & set(test.classes)
    assert abs(len(train.classes) - len(test.classes)) <= 1
    dejavu = {Path(name).stem for name in matplotlib_dejavu().names}
    for split, fonts in ((train, dejavu), (test, {Path(name).stem for name in STIX})):
        by_class = {}
        for path, label in zip(split.paths, split.labels):
            by_class.setdefault(label, set()).add(Path(path).stem)
        assert all(drawn == fonts for drawn in by_class.values())  # every class in every font of its side only
    assert split_list.info["test_fonts"] == list(STIX)
    prepare_typefaces(tmp_path / "b", limit=40, test=stix)
    assert files(tmp_path / "a") == files(tmp_path / "b")


@pytest.mark.parametrize("dejavu_side", SIDES)
def test_characters_drawn_alike_by_either_side_are_kept_once(stix, dejavu_side):
    # DejaVu draws Greek capital Alpha as Latin A, STIX does not: Alpha goes whichever side DejaVu is on
    sides = (matplotlib_dejavu(), stix) if dejavu_side == "train" else (stix, matplotlib_dejavu())
    points = [0x41, 0x391, 0x410, 0x42, 0x392, 0x412, 0x61, 0x3B1, 0x430]  # Latin, Greek, Cyrillic
    kept = typefaces.distinct_characters(points, *sides)
    dropped = [p for p in points if p not in kept]
    assert ord("A") in kept and 0x391 in dropped
    alone = {p: typefaces.distinct_characters([p], *sides)[p] for p in points}  # nothing earlier to match

    def signature(point, side):
        return b"".join(pixels.tobytes() for pixels in alone[point][side].values())

    assert signature(0x41, dejavu_side) == signature(0x391, dejavu_side)
    stix_side = "test" if dejavu_side == "train" else "train"
    assert signature(0x41, stix_side) != signature(0x391, stix_side)
    for side in SIDES:  # no two kept characters drawn alike on either side
        assert len({signature(p, side) for p in kept}) == len(kept)
    for point in dropped:  # each one left out is drawn exactly as an earlier kept character on some side
        assert any(signature(point, side) == signature(other, side) for other in kept if other < point
                   for side in SIDES)


def test_a_character_some_font_draws_blank_is_left_out(monkeypatch, stix):
    blank_font = Path(STIX[-1]).name
    real = typefaces.render

    def render(face, point):
        return None if point == ord("B") and Path(face.path).name == blank_font else real(face, point)

    monkeypatch.setattr(typefaces, "render", render)
    kept = typefaces.distinct_characters([ord("A"), ord("B"), ord("C")], matplotlib_dejavu(), stix)
    assert sorted(kept) == [ord("A"), ord("C")]
    assert all(pixels.max() > 0 for drawn in kept.values() for side in drawn.values() for pixels in side.values())


def test_missing_liberation_fonts_are_a_one_line_error_naming_the_package(tmp_path, monkeypatch, capsys):
    absent = not_installed(tmp_path)
    with pytest.raises(ReirError) as error:
        prepare_typefaces(tmp_path / "data", test=absent)
    assert "\n" not in str(error.value) and "apt-get install -y fonts-liberation" in str(error.value)
    monkeypatch.setattr(typefaces, "LIBERATION", absent)
    assert prepare_main(["--data_name", "typefaces", "--data_path", str(tmp_path / "data")]) == 1
    message = capsys.readouterr().err.strip()
    assert len(message.splitlines()) == 1 and "apt-get install -y fonts-liberation" in message
    assert "LiberationSans-Regular.ttf" in message and str(tmp_path / "no-fonts") in message
    assert not split_list_path(tmp_path / "data", "typefaces", "uncropped").exists()


def test_the_accuracy_benchmark_reads_its_classes_from_the_built_set(tmp_path, monkeypatch, stix):
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", REPO / "benchmarks" / "accuracy.py")
    accuracy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(accuracy)
    with monkeypatch.context() as patch:  # not built, no Liberation fonts: a one-line stop, no traceback
        patch.setattr(typefaces, "LIBERATION", not_installed(tmp_path))
        with pytest.raises(SystemExit) as stop:
            accuracy.main(["--datasets", "typefaces", "--data_path", str(tmp_path / "empty"),
                           "--methods", "raw pixels"])
        assert str(stop.value).startswith("error: ") and "\n" not in str(stop.value)
        assert "apt-get install -y fonts-liberation" in str(stop.value)
    built = prepare_typefaces(tmp_path / "data", limit=40, test=stix)
    work = tmp_path / "work"
    assert accuracy.main(["--datasets", "typefaces", "--data_path", str(tmp_path / "data"), "--work", str(work),
                          "--train_classes", "5", "--test_classes", "6", "--image_size", "16", "--epochs", "1",
                          "--seeds", "0", "--methods", "raw pixels"]) == 0
    chosen = load_custom(work / "typefaces" / "typefaces.csv", "uncropped")
    assert len(chosen.splits["train"].classes) == 5 and len(chosen.splits["test"].classes) == 6
    for split in ("train", "test"):
        assert set(chosen.splits[split].classes) <= set(built.splits[split].classes)


def test_the_pretraining_check_takes_the_classes_from_the_sets_definition(tmp_path, monkeypatch, stix):
    spec = importlib.util.spec_from_file_location("pretrain_benchmark", REPO / "benchmarks" / "pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    monkeypatch.setattr(pretrain, "LIBERATION", stix)
    targets = pretrain.target_classes()
    built = prepare_typefaces(tmp_path / "data", limit=40, test=stix)
    assert {int(name[2:], 16) for split in built.splits.values() for name in split.labels} <= targets["typefaces"]
    assert targets["typefaces"] == set(typefaces.candidate_characters(matplotlib_dejavu(), stix))
    assert targets["typefaces"] <= pretrain.target_font_characters()
    one_class = int(built.splits["test"].labels[0][2:], 16)
    with pytest.raises(SystemExit, match="classes of the typefaces target"):
        pretrain.check_disjoint([one_class], {"typefaces": targets["typefaces"]})
    # without the test fonts: every character the training fonts share, a superset of any build's classes
    monkeypatch.setattr(pretrain, "LIBERATION", not_installed(tmp_path))
    assert pretrain.target_classes()["typefaces"] > targets["typefaces"]
