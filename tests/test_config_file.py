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


def test_a_configuration_recorded_before_the_network_settings_moved_to_model_config_still_loads(tmp_path):
    """Records written by earlier versions: the run's own settings first, the head settings among the loss terms,
    and none of the settings added since (they take their defaults, which reproduce the earlier behaviour)."""
    from reir.training.config import TrainConfig

    earlier = {"data_name": "digits", "crop_type": "uncropped", "label_type": "fixed", "recalls": [1, 2],
               "model_type": "resnet34", "share_type": "layer4", "with_random": True, "load_ids": False,
               "batch_size": 8, "num_epochs": 3, "ensemble_size": 5, "meta_class_size": 3, "gpu_ids": [0],
               "weights": "none", "seed": 9, "image_size": 32, "data_path": "data", "output_dir": "out",
               "num_workers": 0, "device": "cpu", "resume": None, "head": "cosine", "head_scale": 8.0}
    path = tmp_path / "earlier_config.json"
    path.write_text(json.dumps(earlier))
    config = TrainConfig.load(path)
    assert {name: getattr(config, name) for name in earlier} == earlier
    assert (config.amp, config.recipe, config.pair_loss, config.projection) == ("off", "auto", "none", 0)
    assert config.model.head_scale == 8.0 and config.model.ensemble_size == 5
    again = tmp_path / "again_config.json"
    again.write_text(json.dumps(config.to_dict()))
    assert TrainConfig.load(again) == config and set(config.to_dict()) >= set(earlier)
    path.write_text(json.dumps({**earlier, "head_scale": 0}))
    assert train_main(["--config", str(path)]) == 2  # checked by the one rule of ModelConfig
