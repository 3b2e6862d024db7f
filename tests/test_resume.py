"""Kill a training run anywhere, resume it, and get the files of a run never interrupted."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from conftest import run_reir, run_script, tiny_args
from reir.cli.messages import exit_code
from reir.fileio import load_tensors
from reir.training.checkpoint import pack, unpack
from reir.training.signals import StopRequest, TrainingStopped

NAME = "digits_uncropped_fixed_random_layer4_resnet18_3_2"


def train_args(data: Path, workers: int, *extra: str) -> list[str]:
    # Relative --output_dir, so runs in different folders record identical configurations.
    return tiny_args(data, Path("out"), "--share_type", "layer4", "--with_random", "--num_epochs", "2",
                     "--batch_size", "10", "--num_workers", str(workers), *extra)


def run(folder: Path, data: Path, workers: int, kill_at: str | None = None, resume: bool = False):
    """train.py, or with ``kill_at`` (``event:n[:signal]``) a run that kills itself there."""
    folder.mkdir(exist_ok=True)
    flags = train_args(data, workers, *(["--resume", "auto"] if resume else []))
    if kill_at:
        return run_script("tests/train_with_kill.py", kill_at, *flags, cwd=folder)
    return run_script("train.py", *flags, cwd=folder)


def outputs(folder: Path) -> dict[str, object]:
    """The statistics CSV bytes, and the database's tensors and metadata (but ``num_workers``)."""
    out = folder / "out"
    tensors, meta = load_tensors(out / "results" / f"{NAME}_data_base.safetensors")
    del meta["config"]["num_workers"]
    model, _ = load_tensors(out / "epochs" / f"{NAME}_model.safetensors")
    # Paths are recorded absolute: the run's folder is the one difference allowed.
    return {"csv": (out / "statistics" / f"{NAME}_results.csv").read_bytes(),
            "meta": json.dumps(meta).replace(str(folder.resolve()), "<run folder>"),
            "features": {k: hashlib.sha256(v.numpy().tobytes()).hexdigest() for k, v in tensors.items()},
            "model": hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(model.items()))).hexdigest()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in (folder / "out").rglob(".*")]


@pytest.fixture(scope="module")
def uninterrupted(small_digits_root, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    result = run(folder, small_digits_root, 0)
    assert result.returncode == 0, result.stderr
    return outputs(folder)


@pytest.mark.slow
def test_killed_anywhere_resumed_with_any_worker_count_gives_the_same_files(small_digits_root, tmp_path,
                                                                             uninterrupted):
    """One run interrupted five times; the worker count changes between resumes (0 and 2)."""
    data = small_digits_root
    # 40 train images in batches of 10: 4 steps an epoch. SIGKILL mid-epoch 2 (2 workers).
    assert run(tmp_path, data, 2, "step:6").returncode == -9
    # Resumes at the end of epoch 1; SIGTERM after step 2 of epoch 2 saves a mid-epoch checkpoint.
    stopped = run(tmp_path, data, 0, "step:2:TERM", resume=True)
    assert "1 epochs done" in stopped.stdout and stopped.returncode == 143, stopped.stderr
    message = stopped.stderr.strip().splitlines()[-1]
    assert message.startswith("error: stopped by SIGTERM in epoch 2 after step 2;") and "--resume auto" in message
    assert "Traceback" not in stopped.stderr
    # SIGKILL while evaluating (2 workers), then while saving the model (no workers): each resumes mid-epoch 2.
    for workers, kill_at in ((2, "eval_batch:2"), (0, "save:3")):
        killed = run(tmp_path, data, workers, kill_at, resume=True)
        assert killed.returncode == -9, killed.stderr
        assert "1 epochs done, 2 steps into the next" in killed.stdout
    assert leftovers(tmp_path), "the kill while saving should have left a temporary file"
    finished = run(tmp_path, data, 2, resume=True)
    assert finished.returncode == 0, finished.stderr
    assert outputs(tmp_path) == uninterrupted
    assert leftovers(tmp_path) == []


def test_a_signal_before_training_stops_at_once_and_during_training_after_the_step():
    stop = StopRequest()
    with stop.installed():
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
        stop.check()  # nothing requested yet
        stop.arm()
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
        with pytest.raises(TrainingStopped):
            stop.check()
        with pytest.raises(KeyboardInterrupt):  # a second signal: stop now
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    error = stop.error(Path("x.safetensors"), "after epoch 1")
    assert exit_code(error) == 128 + signal.SIGTERM == 143 and "plus `resume` auto" in str(error)


def test_optimizer_and_scheduler_states_survive_the_json_round_trip():
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[1, 3], gamma=0.1)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step()
        scheduler.step()
    tensors: dict[str, torch.Tensor] = {}
    packed = json.loads(json.dumps([pack(optimizer.state_dict(), tensors, "o"),
                                    pack(scheduler.state_dict(), tensors, "s")]))
    restored_optimizer, restored_scheduler = unpack(packed, tensors)
    assert restored_scheduler == scheduler.state_dict()
    original = optimizer.state_dict()
    assert restored_optimizer["param_groups"] == original["param_groups"]
    for index, values in original["state"].items():
        for key, value in values.items():
            assert torch.equal(restored_optimizer["state"][index][key], value)
    with pytest.raises(TypeError):
        pack(object(), {}, "x")


def save_tiny_checkpoint(folder: Path, config, recorded: dict | None = None) -> Path:
    """A checkpoint of a ``Linear(3, 2)`` after one epoch, recording ``recorded`` (default: ``config``'s settings
    as a run records them); no training."""
    from reir.training.checkpoint import TrainingState, checkpoint_path, save_checkpoint
    from reir.training.precision import precision_for

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    run_config = recorded if recorded is not None else {**config.to_dict(), "save_name": config.save_name,
                                                          "num_train_classes": 4}
    return save_checkpoint(checkpoint_path(folder, config.save_name), model, optimizer,
                           torch.optim.lr_scheduler.StepLR(optimizer, 1), precision_for("off", "cpu").scaler,
                           TrainingState(epoch=1), torch.zeros(2, 4, dtype=torch.long), ["a", "b", "c", "d"],
                           {**run_config, "save_name": config.save_name})


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """One checkpoint, made once, that every resume check of this module compares settings against."""
    from reir.training.config import TrainConfig

    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    config = TrainConfig(data_name="digits", seed=3, weights="none", output_dir=str(folder), device="cpu",
                         share_type="layer4", ensemble_size=3, meta_class_size=2, image_size=32, batch_size=8)
    return save_tiny_checkpoint(folder, config), config


def test_the_fp16_loss_scale_is_checkpointed_and_restored(tmp_path):
    from reir.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
    from reir.training.config import TrainConfig
    from reir.training.precision import precision_for

    def trainables():
        torch.manual_seed(0)
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters())
        return model, optimizer, torch.optim.lr_scheduler.MultiStepLR(optimizer, [1]), precision_for("fp16", "cpu")

    model, optimizer, scheduler, precision = trainables()
    scaled = {**precision.scaler.state_dict(), "scale": 1024.0, "_growth_tracker": 7}  # after overflows
    precision.scaler.load_state_dict(scaled)
    config = TrainConfig(data_name="digits", amp="fp16", seed=3, output_dir=str(tmp_path))
    run_config = {**config.to_dict(), "save_name": config.save_name}
    path = save_checkpoint(tmp_path / "checkpoints" / f"{config.save_name}_checkpoint.safetensors", model, optimizer,
                           scheduler, precision.scaler, TrainingState(epoch=1), torch.zeros(2, 4, dtype=torch.long),
                           ["a", "b", "c", "d"], run_config)
    model, optimizer, scheduler, fresh = trainables()
    assert fresh.scaler.state_dict()["scale"] != 1024.0
    load_checkpoint(path).restore(model, optimizer, scheduler, fresh.scaler)
    assert fresh.scaler.state_dict() == scaled


def other_value(name: str, value):
    """A valid setting different from ``value`` for the TrainConfig field ``name``, found from its type and
    declared choices."""
    from dataclasses import fields

    from reir.training.config import TrainConfig

    choices = next(f.metadata["choices"] for f in fields(TrainConfig) if f.name == name)
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, list):
        return value[:1]
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}_elsewhere.safetensors" if isinstance(value, str) else 1


def must_match_settings() -> list[str]:
    from dataclasses import fields

    from reir.settings import MUST_MATCH
    from reir.training.config import TrainConfig, resume_rule

    return [f.name for f in fields(TrainConfig) if resume_rule(f) == MUST_MATCH]


def test_every_setting_has_a_resume_rule_and_the_run_defining_ones_must_match():
    from dataclasses import fields

    from reir.model.network import ModelConfig
    from reir.settings import RESUME_RULES
    from reir.training.config import TrainConfig, resume_rule

    unruled = [f.name for f in fields(TrainConfig) if resume_rule(f) not in RESUME_RULES]
    assert not unruled, f"settings without a resume rule: {unruled}"
    # What the hand-kept list of checked settings once missed, and every setting of the network.
    assert {"head", "head_scale", "learn_scale", "projection", "pair_loss", "pair_weight", "samples_per_class",
            "data_path", *(f.name for f in fields(ModelConfig))} <= set(must_match_settings())
    assert not {"num_workers", "device", "channels_last", "branch_batching", "output_dir"} & set(must_match_settings())


@pytest.mark.parametrize("name", must_match_settings())
def test_a_resume_with_any_must_match_setting_changed_is_refused_naming_the_setting_and_both_values(
        tiny_checkpoint, name):
    """The train entry point refuses before it reads any data or builds the network; the command line shows
    the setting as its flag."""
    from reir.cli.messages import as_flags
    from reir.errors import UsageError
    from reir.training.train import train

    path, config = tiny_checkpoint
    saved = getattr(config, name)
    changed = config.replace(resume=str(path), **{name: other_value(name, saved)})
    with pytest.raises(UsageError) as error:
        train(changed)
    message = str(error.value)
    values = f"{saved!r} (not {getattr(changed, name)!r})"
    assert f"`{name}` {values}" in message and "\n" not in message, message
    assert f"--{name} {values}" in as_flags(message)


def test_the_checks_of_a_resume(tiny_checkpoint, tmp_path):
    from reir.training.checkpoint import find_checkpoint, load_checkpoint, resume_conflicts

    path, config = tiny_checkpoint
    recorded = load_checkpoint(path).meta["config"]
    assert recorded == json.loads(json.dumps({**config.to_dict(), "save_name": config.save_name,
                                              "num_train_classes": 4}))
    assert resume_conflicts(recorded, config) == []
    assert resume_conflicts(recorded, config.replace(seed=None)) == []  # no seed given takes the checkpoint's
    # Settings that change only the speed or the outputs of a run may differ.
    faster = config.replace(num_workers=0, channels_last=True, branch_batching="grouped", device="cpu", gpu_ids=[3],
                            nmi_every=0, tensorboard=True, output_dir=str(tmp_path))
    assert resume_conflicts(recorded, faster) == []
    assert find_checkpoint(str(path), tmp_path, config.save_name, faster).meta["epoch"] == 1
    # A checkpoint written before a setting existed ran with its default.
    older = {k: v for k, v in recorded.items() if k not in ("head", "head_scale", "pair_loss")}
    assert resume_conflicts(older, config) == []
    assert resume_conflicts(older, config.replace(head="cosine", head_scale=8.0)) == [
        ("head", "linear", "cosine"), ("head_scale", 16.0, 8.0)]


def test_a_changed_head_scale_is_refused_on_the_command_line_not_taken_from_the_checkpoint(tiny_checkpoint):
    """The cosine head keeps its scale in a buffer that a resume would load over the flag."""
    path, config = tiny_checkpoint
    names = ("data_name", "seed", "weights", "device", "output_dir", "share_type", "ensemble_size", "meta_class_size",
             "image_size", "batch_size")
    flags = [arg for name in names for arg in (f"--{name}", str(getattr(config, name)))]
    result = run_reir("train", *flags, "--head_scale", "8", "--resume", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (f"error: checkpoint {path} was written with --head_scale 16.0 (not 8.0); "
                                     "resume with the same settings or start without --resume")


@pytest.mark.slow
def test_a_resume_takes_the_weights_from_the_checkpoint_and_refuses_other_weights(small_digits_root, tmp_path):
    """The --weights file of the first run is gone when it resumes: nothing is read or downloaded for it."""
    import torchvision
    from safetensors.torch import save_file

    weights = tmp_path / "backbone.safetensors"
    save_file(torchvision.models.resnet18().state_dict(), str(weights))
    flags = tiny_args(small_digits_root, tmp_path / "out", "--share_type", "layer4", "--num_epochs", "2",
                      "--batch_size", "20", "--weights", str(weights), "--nmi_every", "0")
    killed = run_script("tests/train_with_kill.py", "step:3", *flags)
    assert killed.returncode == -9, killed.stderr
    weights.unlink()
    name = "digits_uncropped_fixed_unrandom_layer4_resnet18_3_2"
    other = run_reir("train", *flags, "--weights", "none", "--resume", "auto")
    assert other.returncode == 2 and f"--weights {str(weights)!r} (not 'none')" in other.stderr.strip().splitlines()[-1]
    resumed = run_reir("train", *flags, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    assert "2 epochs done" not in resumed.stdout and "Resuming from" in resumed.stdout
    rows = (tmp_path / "out" / "statistics" / f"{name}_results.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == ["1", "2"]
