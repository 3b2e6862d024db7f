"""Files that would run code when unpickled are refused, and the code never runs."""

from __future__ import annotations

import builtins
import pickle

import pytest
import torch

from conftest import run_script, tiny_args
from reir import cli
from reir.cli.common import reports_errors
from reir.cli.train import get_args_parser
from reir.cli.train import main as train_main
from reir.retrieval.database import load_database
from reir.training.checkpoint import checkpoint_path
from reir.training.config import TrainConfig


class Payload:
    """Unpickling this creates the file ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def plant(path, marker, torch_format: bool) -> None:
    """A pickle that creates ``marker`` on load, as raw pickle bytes or as a torch.save zip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        torch.save({"weight": torch.zeros(1), "evil": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))


@pytest.mark.parametrize("torch_format", [False, True])
def test_the_planted_pickles_do_run_code_when_unpickled(tmp_path, torch_format):
    """The control: loading these files the unsafe way really creates the marker."""
    marker = tmp_path / "ran"
    plant(tmp_path / "file", marker, torch_format)
    if torch_format:
        torch.load(tmp_path / "file", weights_only=False)
    else:
        pickle.loads((tmp_path / "file").read_bytes())
    assert marker.exists()


def assert_refused(code, err, marker, exit_code=1):
    assert code == exit_code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err
    assert not marker.exists(), "the planted code ran"
    return lines[0]


@pytest.mark.parametrize("torch_format", [False, True])
def test_a_pickle_under_a_database_name_is_refused(tmp_path, capsys, torch_format):
    marker = tmp_path / "ran"
    for name in ("x_data_base.safetensors", "x_data_base.pth"):
        plant(tmp_path / "results" / name, marker, torch_format)
        code = reports_errors(lambda: load_database(tmp_path / "results" / name))()  # noqa: B023 - called at once
        line = assert_refused(code, capsys.readouterr().err, marker)
        assert "only safetensors files written by REIR are loaded" in line
        code = cli.main(["eval", "--data_base", str(tmp_path / "results" / name)])
        assert "only safetensors files" in assert_refused(code, capsys.readouterr().err, marker)


def test_a_pickle_under_the_checkpoint_name_is_refused_by_resume_auto(small_digits_root, tmp_path):
    marker = tmp_path / "ran"
    args = tiny_args(small_digits_root, tmp_path / "out", "--resume", "auto")
    save_name = TrainConfig.from_args(get_args_parser().parse_args(args)).save_name
    plant(checkpoint_path(tmp_path / "out", save_name), marker, True)
    result = run_script("train.py", *args)
    line = assert_refused(result.returncode, result.stderr, marker)
    assert "checkpoint" in line and "not a REIR safetensors file" in line


@pytest.mark.parametrize("torch_format", [False, True])
def test_a_pickle_given_to_resume_is_refused(small_digits_root, tmp_path, capsys, torch_format):
    marker = tmp_path / "ran"
    plant(tmp_path / "run.pth", marker, torch_format)
    code = train_main(tiny_args(small_digits_root, tmp_path / "out", "--resume", str(tmp_path / "run.pth")))
    assert "checkpoint" in assert_refused(code, capsys.readouterr().err, marker)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("torch_format", [False, True])
def test_a_pickle_given_as_weights_is_refused(small_digits_root, tmp_path, capsys, torch_format):
    marker = tmp_path / "ran"
    plant(tmp_path / "resnet18.pth", marker, torch_format)
    args = tiny_args(small_digits_root, tmp_path / "out")
    args[args.index("--weights") + 1] = str(tmp_path / "resnet18.pth")
    line = assert_refused(train_main(args), capsys.readouterr().err, marker, exit_code=2)
    assert "--weights" in line and ("cannot be loaded safely" in line or "no state dict" in line)
    assert not (tmp_path / "out").exists(), "nothing is written before the weights are checked"


@pytest.mark.parametrize("torch_format", [False, True])
def test_a_pickle_in_torchvisions_imagenet_cache_is_refused(tmp_path, monkeypatch, capsys, torch_format):
    """torchvision unpickles its cached weights in full (``weights_only=False``); REIR reads that file itself."""
    import torchvision

    from reir.model.network import ModelConfig, create_model

    marker = tmp_path / "ran"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    cached = tmp_path / "torch" / "hub" / "checkpoints" / torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url.rsplit(
        "/", 1)[-1]
    plant(cached, marker, torch_format)
    code = reports_errors(lambda: create_model(ModelConfig("resnet18", "layer4", 2, 2), weights="imagenet"))()
    line = assert_refused(code, capsys.readouterr().err, marker)
    assert str(cached) in line and "corrupt" in line
