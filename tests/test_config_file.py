"""``reir train --config statistics/<name>_config.json``: a recorded run repeated, flags beside it overriding."""

from __future__ import annotations

import json

from reir.cli.train import main as train_main
from tests.conftest import tiny_args

NAME = "digits_uncropped_fixed_unrandom_layer4_resnet18_3_2"


def recorded(output) -> dict:
    return json.loads((output / "statistics" / f"{NAME}_config.json").read_text())


def statistics(output) -> list[str]:
    return (output / "statistics" / f"{NAME}_results.csv").read_text().splitlines()


def test_config_file_repeats_the_run_and_flags_override_it(small_digits_root, tmp_path, capsys):
    first, again, changed = tmp_path / "first", tmp_path / "again", tmp_path / "changed"
    assert train_main(tiny_args(small_digits_root, first, "--seed", "7", "--nmi_every", "0")) == 0
    config = first / "statistics" / f"{NAME}_config.json"
    original = recorded(first)

    assert train_main(["--config", str(config), "--output_dir", str(again)]) == 0
    assert recorded(again) == {**original, "output_dir": str(again)}
    assert statistics(again) == statistics(first), "the same seed and settings give the same numbers"

    # --batch_size 10 is the flag's default: typed beside --config it still wins over the record's 64
    assert train_main(["--config", str(config), "--output_dir", str(changed), "--num_epochs", "2",
                       "--batch_size", "10"]) == 0
    assert recorded(changed) == {**original, "output_dir": str(changed), "num_epochs": 2, "batch_size": 10}
    assert len(statistics(changed)) == 3  # header and two epochs
    assert recorded(first) == original, "the record that was read is left alone"


def test_bad_config_file_is_a_one_line_error(tmp_path, capsys):
    assert train_main(["--config", str(tmp_path / "missing_config.json")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "missing_config.json does not exist" in err
    bad = tmp_path / "bad_config.json"
    bad.write_text(json.dumps({"ensemble_sizes": 3}))
    assert train_main(["--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unknown settings ['ensemble_sizes']" in err
