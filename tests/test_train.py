"""train.py end to end on digits and its flags."""

import csv

import pytest
import torch

from conftest import REPO, run_reir, run_script, tiny_args
from reir.cli.train import get_args_parser
from reir.cli.train import main as train_main
from reir.devices import parse_device, training_devices
from reir.errors import ReirError
from reir.fileio import load_tensors
from reir.retrieval.database import load_database
from reir.training.config import TrainConfig

ORIGINAL_DEFAULTS = {
    "data_name": "car", "crop_type": "uncropped", "label_type": "fixed", "recalls": [1, 2, 4, 8],
    "model_type": "resnet18", "share_type": "layer1", "with_random": False, "load_ids": False,
    "batch_size": 10, "num_epochs": 20, "ensemble_size": 48, "meta_class_size": 12, "gpu_ids": [0, 1],
}


def test_every_original_flag_has_the_original_default():
    args = get_args_parser().parse_args([])
    for flag, default in ORIGINAL_DEFAULTS.items():
        assert getattr(args, flag) == default, flag
    assert (args.weights, args.image_size, args.data_path, args.output_dir) == ("imagenet", 256, "data", ".")
    choices = {a.dest: a.choices for a in get_args_parser()._actions}
    assert set(choices["data_name"]) >= {"car", "cub", "sop", "isc", "digits"}
    assert choices["model_type"] == ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
    assert choices["share_type"] == ("none", "maxpool", "layer1", "layer2", "layer3", "layer4")


def test_help_lists_every_original_flag():
    result = run_script("train.py", "--help")
    assert result.returncode == 0
    for flag in ORIGINAL_DEFAULTS:
        assert f"--{flag}" in result.stdout


def test_bad_flag_value_is_one_line_usage_error():
    result = run_script("train.py", "--model_type", "vgg")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "invalid choice" in result.stderr


def test_absent_gpu_ids_do_not_crash_and_cuda_n_means_that_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert training_devices(None, [0, 3]) == [torch.device("cuda", 0)]
    assert "[3] do not exist" in capsys.readouterr().err
    assert training_devices("cuda", [0, 1]) == [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert training_devices("cuda:1", [0, 1]) == [torch.device("cuda", 1)]  # was cuda:0 and cuda:1
    assert training_devices("cpu", [0, 1]) == [torch.device("cpu")]
    with pytest.raises(ReirError, match="cuda:2 does not exist"):
        parse_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert training_devices(None, [0, 1]) == [torch.device("cpu")]
    with pytest.raises(ReirError, match="no CUDA GPU"):
        training_devices("cuda:0", [0])


def test_params_command_prints_the_table_cell():
    result = run_reir("params", "--model_type", "resnet50", "--meta_class_size", "512")
    assert result.returncode == 0 and result.stdout.splitlines()[0] == "1,168,150,592"


def test_params_table_prints_readmes_whole_table():
    result = run_reir("params", "--table")
    assert result.returncode == 0, result.stderr
    readme = (REPO / "README.md").read_text()
    printed = [line.split(" | ")[1:] for line in result.stdout.splitlines() if line.startswith("| res")]
    quoted = [line.split(" | ")[1:] for line in readme.splitlines() if line.startswith("| res")
              and line.count(",") >= 8]
    assert len(printed) == 4 and printed == quoted


@pytest.mark.slow
def test_training_on_digits_writes_every_output(small_digits_root, tmp_path):
    out = tmp_path / "out"
    # the seed's sharing point (layer1): branches that hold layers 2-4, end to end through train.py
    result = run_script("train.py", *tiny_args(small_digits_root, out, "--num_epochs", "2", "--with_random",
                                                      "--nmi_every", "2", "--share_type", "layer1"))
    assert result.returncode == 0, result.stderr
    name = "digits_uncropped_fixed_random_layer1_resnet18_3_2"
    with open(out / "statistics" / f"{name}_results.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert {"train_loss", "train_accuracy", "test_recall@1", "test_recall@8"} <= set(rows[0])
    assert all(0 <= float(r["test_recall@1"]) <= 1 for r in rows)
    for column in ("test_precision@1", "test_r_precision", "test_map@r"):
        assert all(0 <= float(r[column]) <= 1 for r in rows), column
    assert rows[0]["test_nmi"] == "" and 0 <= float(rows[1]["test_nmi"]) <= 1  # NMI every 2nd epoch
    database = load_database(out / "results" / f"{name}_data_base.safetensors")
    assert database.features["test"].shape == (len(database.paths("test")), 3, 2)
    assert database.features["train"].shape[1:] == (3, 2)
    assert set(database.labels("train")) == {"0", "1", "2", "3", "4"}
    assert database.config["with_random"] is True and database.config["seed"] == 0
    best = max(float(r["test_recall@1"]) for r in rows)
    assert database.info["metrics"]["recall@1"] == pytest.approx(best)
    state, meta = load_tensors(out / "epochs" / f"{name}_model.safetensors")
    assert meta["model"]["ensemble_size"] == 3 and any(k.startswith("branches.2.") for k in state)
    assert (out / "results" / "digits_uncropped_3_2_ids.json").is_file()
    assert "Best R@1" in result.stdout


def test_load_ids_reuses_saved_assignment(small_digits_root, tmp_path, capsys):
    out = tmp_path / "out"
    assert train_main(tiny_args(small_digits_root, out, "--label_type", "random")) == 0, capsys.readouterr().err
    ids_file = out / "results" / "digits_uncropped_3_2_ids.json"
    before = ids_file.read_bytes()
    capsys.readouterr()
    # another seed is another run: it replaces the first one's files only when told to
    again = train_main(tiny_args(small_digits_root, out, "--label_type", "random", "--load_ids", "--seed", "5",
                                 "--overwrite"))
    again_out, again_err = capsys.readouterr()
    assert again == 0, again_err
    assert "Loaded random meta-class ids" in again_out and ids_file.read_bytes() == before
    missing = train_main(tiny_args(small_digits_root, tmp_path / "other", "--load_ids"))
    missing_err = capsys.readouterr().err
    assert missing == 1 and "no saved ids" in missing_err
    assert "Traceback" not in missing_err


def test_meta_class_size_too_large_is_refused(small_digits_root, tmp_path):
    result = run_script("train.py", *tiny_args(small_digits_root, tmp_path, "--meta_class_size", "5"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "smaller than the 5 training classes" in result.stderr


def test_the_config_is_the_command_line_and_python_values_follow_the_same_rules():
    import dataclasses

    from reir.errors import UsageError

    flags = {a.dest for a in get_args_parser()._actions if a.dest != "help"}
    # --config names a recorded run whose settings the other flags override; it is no setting itself
    assert flags == {f.name for f in dataclasses.fields(TrainConfig)} | {"config"}
    assert TrainConfig.from_args(get_args_parser().parse_args([])) == TrainConfig()
    assert TrainConfig(recalls=[8, 1, 2]).recalls == [1, 2, 8]  # the first recall picks the best epoch
    for bad, field in ((dict(batch_size=0), "batch_size"), (dict(model_type="vgg"), "model_type"),
                       (dict(recalls=[0]), "recalls"), (dict(seed=-1), "seed")):
        with pytest.raises(UsageError, match=field):
            TrainConfig(**bad)


def test_every_setting_declares_its_help_its_resume_rule_and_its_flag_once():
    """The parser, the checks and resume all read the fields' metadata: a setting missing any of it fails here."""
    import dataclasses

    from reir.cli.messages import flag_name
    from reir.model.network import ModelConfig
    from reir.settings import RESUME_RULES, default_of
    from reir.training.config import resume_rule

    options = {a.option_strings[0]: a for a in get_args_parser()._actions if a.option_strings}
    for declared in dataclasses.fields(TrainConfig):
        assert declared.metadata.get("help"), f"{declared.name} has no help text"
        assert resume_rule(declared) in RESUME_RULES, f"{declared.name} has no resume rule"
        option = options.get(flag_name(declared.name))
        assert option is not None and option.dest == declared.name, f"{declared.name} has no flag"
        assert option.help == declared.metadata["help"]
        assert option.default == default_of(declared), f"{declared.name}: the flag's default is not the field's"
    # The network's settings are declared once, on ModelConfig, and a training configuration carries all of them.
    network = {f.name: f for f in dataclasses.fields(ModelConfig)}
    assert set(network) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(f is network[f.name] for f in dataclasses.fields(TrainConfig) if f.name in network)
    assert TrainConfig(head="cosine", head_scale=4.0, projection=3).model == ModelConfig(
        head="cosine", head_scale=4.0, projection=3)
    assert TrainConfig().model == ModelConfig()


class _Table(torch.nn.Module):
    """A "model" whose logits for image ``i`` are row ``i`` of a fixed table."""

    def __init__(self, rows: torch.Tensor):
        super().__init__()
        self.rows = torch.nn.Parameter(rows)

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows[index.flatten()]


class _Indexed(torch.utils.data.Dataset):
    def __init__(self, labels: list[str]):
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, item: int):
        return torch.tensor([item]), 0


def test_evaluation_under_amp_ranks_in_fp32_as_reir_eval_does(monkeypatch):
    """Cosines 0.9990 and 0.9995 are one value in bf16; the epoch's statistics must still rank them apart.
    Ranked by tensor operations, as on a GPU, where autocast would reach the score GEMMs (the compiled
    CPU ranking rescores close scores exactly, autocast or not)."""
    from reir.retrieval import metrics as metrics_module
    from reir.retrieval.database import shared_label_ids
    from reir.retrieval.metrics import evaluate_embeddings
    from reir.training.precision import precision_for
    from reir.training.train import evaluate_splits

    monkeypatch.setattr(metrics_module, "COMPILED_SCAN_DEVICES", ())
    angles = torch.tensor([0.0, float(torch.acos(torch.tensor(0.9990))), float(torch.acos(torch.tensor(0.9995)))])
    rows = torch.stack([angles.cos(), angles.sin()], dim=1)[:, None, :]  # [3 images, 1 branch, 2]
    labels = ["a", "b", "b"]
    loader = torch.utils.data.DataLoader(_Indexed(labels), batch_size=2)
    bf16 = precision_for("bf16", "cpu")
    metrics, features = evaluate_splits(_Table(rows), {"test": loader}, [1], torch.device("cpu"), False, bf16)
    (ids,) = shared_label_ids(labels)
    fp32 = evaluate_embeddings(features["test"], ids, [1], with_nmi=False)
    with bf16.autocast():  # the search inside autocast, as training evaluated before
        rounded = evaluate_embeddings(features["test"], ids, [1], with_nmi=False)
    assert rounded["recall@1"] != fp32["recall@1"], "the control: bf16 must change this ranking"
    assert metrics == fp32 and fp32["recall@1"] == pytest.approx(2 / 3)
    monkeypatch.undo()
    with bf16.autocast():
        assert evaluate_embeddings(features["test"], ids, [1], with_nmi=False) == fp32


def test_training_from_python_with_callbacks_saves_its_resolved_config_and_tensorboard(small_digits_root, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from reir.training.train import train

    events = []
    config = TrainConfig(data_name="digits", data_path=str(small_digits_root), output_dir=str(tmp_path),
                         weights="none", share_type="layer4", ensemble_size=3, meta_class_size=2, image_size=16,
                         batch_size=16,
                         num_epochs=2, num_workers=0, device="cpu", nmi_every=0, tensorboard=True)
    result = train(config, callbacks=[events.append])
    assert config.seed is None and isinstance(result.config.seed, int)  # drawn, recorded, the input untouched
    assert TrainConfig.load(result.statistics.with_name(f"{config.save_name}_config.json")) == result.config
    assert result.database.is_file() and result.model.is_file() and 0 <= result.best_recall <= 1
    # 40 training images in batches of 16: three steps an epoch.
    assert [(e.epoch, e.step) for e in events if e.kind == "step"] == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]
    assert sum(e.kind == "eval_batch" for e in events) == 2 * 3  # 40 test images
    rows = [e.row for e in events if e.kind == "epoch"]
    assert [r["epoch"] for r in rows] == [1, 2]
    # --weights none trains with the scratch recipe: its full rate, then the cosine decay
    assert rows[0]["learning_rate"] == pytest.approx(1e-3) and rows[1]["learning_rate"] < 1e-3
    with open(result.statistics) as handle:
        assert [float(r["train_loss"]) for r in csv.DictReader(handle)] == [r["train_loss"] for r in rows]
    board = EventAccumulator(str(tmp_path / "tensorboard" / config.save_name))
    board.Reload()
    expected = {"train/loss", "train/accuracy", "learning_rate", "test/recall@1", "test/recall@8",
                "test/precision@1", "test/r_precision", "test/map@r"}
    assert expected <= set(board.Tags()["scalars"])
    logged = board.Scalars("train/loss")
    assert [s.step for s in logged] == [1, 2]
    assert [s.value for s in logged] == pytest.approx([r["train_loss"] for r in rows])
