"""Writing and reading checkpoints costs no second copy of the training state.

Each measurement runs in its own process: the kernel's peak resident size (VmHWM) is reset
just before the operation and compared with the resident size before it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import REPO
from reir.fileio import load_tensors, save_tensors

# A model of 32 M parameters: with Adam's two moments, a checkpoint of about 390 MB.
MEASURE = r"""
import json, sys
from pathlib import Path
import torch
from reir.training.checkpoint import TrainingState, load_checkpoint, save_checkpoint
from reir.training.precision import precision_for

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

def growth(operation):
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident size
    before = status("VmRSS")
    result = operation()
    return status("VmHWM") - before, result

torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)])
optimizer = torch.optim.Adam(model.parameters())
scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1)
scaler = precision_for("off", "cpu").scaler
path = Path(sys.argv[2])
if sys.argv[1] == "save":
    model(torch.randn(2, 2048)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    config = {"save_name": "x", **{k: None for k in ("data_name crop_type label_type recalls model_type share_type "
              "with_random batch_size num_epochs ensemble_size meta_class_size image_size seed amp").split()}}
    grown, _ = growth(lambda: save_checkpoint(path, model, optimizer, scheduler, scaler, TrainingState(1),
                                              torch.zeros(1, 2, dtype=torch.long), ["a", "b"], config))
else:
    def resume():
        load_checkpoint(path).restore(model, optimizer, scheduler, scaler)
    grown, _ = growth(resume)
state_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"grown": grown, "state": state_bytes, "file": path.stat().st_size}))
"""


def measure(operation: str, path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", MEASURE, operation, str(path)], capture_output=True, text=True,
                            cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to measure peak memory")
def test_a_checkpoint_is_written_and_resumed_without_a_second_copy_of_the_state(tmp_path):
    path = tmp_path / "x_checkpoint.safetensors"
    saved = measure("save", path)
    # The file holds the parameters and Adam's two moments: three times the parameters.
    assert saved["file"] > 3 * saved["state"]
    # Writing streams from the tensors' own storage: far less than one extra copy of the file.
    assert saved["grown"] < 0.2 * saved["file"], saved
    print(f"peak growth: save {saved['grown'] / 2**20:.0f} MiB", end=" ")
    resumed = measure("load", path)
    # Resuming reads the file once into tensors the optimizer keeps (the model's are copied into the
    # parameters and released): no memory map beside them, no second copy.
    print(f"load {resumed['grown'] / 2**20:.0f} MiB, file {saved['file'] / 2**20:.0f} MiB")
    assert resumed["grown"] < 1.15 * resumed["file"], resumed


def test_the_streamed_file_is_standard_safetensors_both_ways(tmp_path):
    tensors = {"weights": torch.randn(5, 3).T, "step": torch.tensor(7), "empty": torch.zeros(0, 4),
               "half": torch.randn(6).to(torch.bfloat16), "mask": torch.tensor([True, False, True]),
               "labels": torch.arange(10, dtype=torch.int32)}
    path = save_tensors(tmp_path / "ours.safetensors", tensors, {"format": "test", "n": 1})
    with safe_open(str(path), framework="pt") as handle:
        assert json.loads(handle.metadata()["reir"]) == {"format": "test", "n": 1}
        assert set(handle.keys()) == set(tensors)
        for key, tensor in tensors.items():
            assert torch.equal(handle.get_tensor(key), tensor) and handle.get_tensor(key).dtype == tensor.dtype
    from safetensors.torch import save_file

    theirs = tmp_path / "theirs.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(theirs), metadata={"reir": '{"n": 2}'})
    loaded, meta = load_tensors(theirs)
    assert meta == {"n": 2} and all(torch.equal(loaded[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("damage", ["truncate", "extend", "overlap"])
def test_a_damaged_tensor_file_is_refused_with_one_line(tmp_path, damage):
    from reir.errors import ReirError

    path = save_tensors(tmp_path / "x.safetensors", {"a": torch.ones(4), "b": torch.ones(4)}, {})
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[:-3]
    elif damage == "extend":
        data += b"\0" * 8
    else:
        length = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + length])
        header["b"]["data_offsets"] = [0, 16]
        encoded = json.dumps(header).encode()
        data = bytearray(len(encoded).to_bytes(8, "little")) + encoded + data[8 + length:]
    path.write_bytes(bytes(data))
    with pytest.raises(ReirError, match="is not a REIR safetensors file"):
        load_tensors(path)


TRAIN = r"""
import json, sys
from reir.training.config import TrainConfig
from reir.training.memory import estimate
from reir.training.train import train

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

config = TrainConfig(data_name="digits", data_path=sys.argv[1], output_dir=sys.argv[2], weights="none",
                     ensemble_size=int(sys.argv[3]), meta_class_size=3, image_size=32, batch_size=20, num_epochs=1,
                     num_workers=0, seed=0, device="cpu", nmi_every=0, branch_batching="loop")
needs = estimate(config.model, config.image_size, config.batch_size, config.recipe, config.weights, "loop")
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")
before = status("VmRSS")
train(config)
print(json.dumps({"grown": status("VmHWM") - before, "estimate": needs.total_bytes}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to measure peak memory")
def test_the_memory_estimate_matches_the_measured_peak_of_training(small_digits_root, tmp_path):
    """resnet18 shared to layer1 (the seed's sharing point) with 2 and 6 branches: the estimate predicts
    the peak within a fixed overhead (data, evaluation, libraries' buffers), and the growth from 2 to 6
    branches within 15 %."""
    measured = {}
    for branches in (2, 6):
        result = subprocess.run([sys.executable, "-c", TRAIN, str(small_digits_root), str(tmp_path / str(branches)),
                                 str(branches)], capture_output=True, text=True, cwd=REPO, timeout=300,
                                env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0, result.stderr
        measured[branches] = json.loads(result.stdout.strip().splitlines()[-1])
        grown, estimated = measured[branches]["grown"], measured[branches]["estimate"]
        assert 0.9 * estimated < grown < estimated + 0.5 * 2**30, measured
    print({b: {k: f"{v / 2**20:.0f} MiB" for k, v in m.items()} for b, m in measured.items()})
    slope = measured[6]["grown"] - measured[2]["grown"]
    predicted = measured[6]["estimate"] - measured[2]["estimate"]
    assert abs(slope - predicted) < 0.15 * predicted, measured


def test_a_configuration_that_cannot_fit_stops_before_the_model_is_built(tmp_path, monkeypatch):
    """The error names the need, what is free and flags that fit; each suggested setting does fit."""
    import re
    from dataclasses import replace

    from reir.cli.messages import exit_code
    from reir.errors import ReirError
    from reir.model import network
    from reir.training import memory
    from reir.training.config import TrainConfig
    from reir.training.train import train

    config = TrainConfig(data_name="digits", data_path=str(tmp_path / "no data"), output_dir=str(tmp_path / "out"),
                         weights="none", image_size=64, batch_size=8, device="cpu", seed=0)
    needs = memory.estimate(config.model, 64, 8, "auto", "none", "loop")
    assert needs.parameters == network.count_parameters(config.model) == 529_365_376
    free = needs.total_bytes // 3
    monkeypatch.setattr(memory, "host_available", lambda: free)
    monkeypatch.setattr(network, "create_model", lambda *a, **k: pytest.fail("the model was built"))
    with pytest.raises(ReirError) as error:
        train(config)
    message = str(error.value)
    assert "\n" not in message and exit_code(error.value) == 2
    assert f"{needs.total_bytes / 2**30:.2f} GiB" in message and f"{free / 2**30:.2f} GiB free" in message
    assert not (tmp_path / "out").exists()
    share = re.search(r"`share_type` (\w+)", message).group(1)
    branches = int(re.search(r"`ensemble_size` (\d+)", message).group(1))
    assert memory.estimate(replace(config.model, share_type=share), 64, 8, "auto", "none", "loop").total_bytes <= free
    smaller = memory.estimate(replace(config.model, ensemble_size=branches), 64, 8, "auto", "none", "loop")
    larger = memory.estimate(replace(config.model, ensemble_size=branches + 1), 64, 8, "auto", "none", "loop")
    assert smaller.total_bytes <= free < larger.total_bytes
    assert "more devices" in message or "GPUs" in message
