"""Branch sharding, branch batching, mixed precision and layout: same answers as the plain loop."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from reir.cli.train import main as train_main
from reir.model.branches import DEFAULT_BATCHING, resolve_batching
from reir.model.network import ModelConfig, create_model
from reir.model.sharding import describe, split_evenly
from reir.training.precision import precision_for
from reir.training.train import train_one_epoch
from tests.conftest import tiny_args

CPU = torch.device("cpu")


def _model(model_type="resnet18", share_type="layer1", ensemble=3, meta=4, with_random=True, dtype=torch.float64):
    torch.manual_seed(0)
    return create_model(ModelConfig(model_type, share_type, ensemble, meta, with_random), weights="none").to(dtype)


def prepare_model(model, devices, batching, channels_last=False):
    """What train.py does with the speed flags."""
    model.shard(devices)
    model.branch_batching = resolve_batching(batching, devices[0])
    return model.use_channels_last() if channels_last else model


def _step(model, images, seed=1):
    """Forward and backward with the random branch weights drawn from ``seed``."""
    torch.manual_seed(seed)
    logits = model(images)
    logits.square().sum().backward()
    return logits


def _assert_same_training(reference, other, images):
    expected, got = _step(reference, images), _step(other, images)
    torch.testing.assert_close(got, expected)
    for (name, a), b in zip(reference.named_parameters(), other.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)
    for a, b in zip(reference.buffers(), other.buffers()):
        torch.testing.assert_close(b, a)
    reference.eval(), other.eval()
    torch.testing.assert_close(other(images), reference(images))


@pytest.mark.parametrize("count,parts", [(48, 2), (48, 5), (7, 3), (2, 4), (1, 1)])
def test_split_evenly(count, parts):
    ranges = split_evenly(count, parts)
    sizes = [len(r) for r in ranges]
    assert len(ranges) == parts and sum(sizes) == count and max(sizes) - min(sizes) <= 1
    assert [i for r in ranges for i in r] == list(range(count))


def test_sharding_over_three_devices_trains_like_one():
    """fp32 and exact: every branch runs the same kernels as in the loop, only the gather differs."""
    reference = _model(ensemble=5, dtype=torch.float32)
    sharded = copy.deepcopy(reference)
    prepare_model(sharded, [CPU, CPU, CPU], "loop")
    assert [list(group) for _, group in sharded.shards] == [[0, 1], [2, 3], [4]]
    assert "branches on cpu (2), cpu (2), cpu (1)" in describe(sharded, "off")
    _assert_same_training(reference, sharded, torch.randn(4, 3, 16, 16))


def test_more_devices_than_branches_leaves_the_extra_devices_idle():
    model = _model(ensemble=2)
    prepare_model(model, [CPU] * 4, "loop")
    assert [len(group) for _, group in model.shards] == [1, 1]
    assert model(torch.randn(2, 3, 16, 16, dtype=torch.float64)).shape == (2, 2, 4)


@pytest.mark.parametrize("model_type,share_type", [("resnet18", "layer1"), ("resnet18", "none"),
                                                   ("resnext50_32x4d", "layer3")])
def test_grouped_branches_match_the_loop(model_type, share_type):
    reference = _model(model_type, share_type, ensemble=2)
    grouped = copy.deepcopy(reference)
    prepare_model(grouped, [CPU, CPU], "grouped")
    assert grouped.branch_batching == "grouped"
    # float64: in fp32 the grouped kernels round differently, and BatchNorm over 4 images of 1x1
    # pixels (layer4 at this size) magnifies that rounding.
    _assert_same_training(reference, grouped, torch.randn(4, 3, 16, 16, dtype=torch.float64))


def test_auto_batching_follows_the_measured_table():
    model = _model(ensemble=2)
    prepare_model(model, [CPU], "auto")
    assert model.branch_batching == DEFAULT_BATCHING["cpu"]
    prepare_model(model, [CPU], "loop")
    assert model.branch_batching == "loop"


def test_channels_last_changes_layout_not_results():
    reference = _model(ensemble=2)
    nhwc = copy.deepcopy(reference)
    prepare_model(nhwc, [CPU], "grouped", channels_last=True)
    conv = nhwc.branches[0][0][0].conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    _assert_same_training(reference, nhwc, torch.randn(4, 3, 16, 16, dtype=torch.float64))


def test_bf16_autocast_on_the_cpu_stays_close_to_fp32():
    model = _model(ensemble=2, with_random=False, dtype=torch.float32).eval()
    images = torch.randn(4, 3, 32, 32)
    precision = precision_for("bf16", CPU)
    with torch.no_grad():
        full = model(images)
        with precision.autocast():
            half = model(images)
    assert half.dtype == torch.bfloat16
    cosine = F.cosine_similarity(half.float().flatten(1), full.flatten(1)).min()
    assert cosine > 0.99


@pytest.mark.slow
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_step_lowers_the_loss(amp):
    # branches as heads (layer4 shared): fp16 kernels are slow on CPUs, and the step's mechanics do not need depth
    model = _model(share_type="layer4", ensemble=2, meta=2, with_random=False, dtype=torch.float32)
    images, targets = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    precision = precision_for(amp, CPU)
    assert precision.scaler.is_enabled() == (amp == "fp16")
    losses = []
    for _ in range(5):  # fp16 skips the steps whose scaled gradients overflow, then lowers the scale
        with precision.autocast():
            loss = F.cross_entropy(model(images).flatten(0, 1).float(), targets.flatten())
        precision.step(loss, optimizer)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"


def test_train_one_epoch_runs_under_bf16():
    model = _model(ensemble=2, meta=2, with_random=False, dtype=torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    data = TensorDataset(torch.randn(12, 3, 16, 16), torch.tensor([0, 1, 2] * 4))
    meta_labels = torch.tensor([[0, 1, 1], [1, 0, 1]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss, accuracy = train_one_epoch(model, DataLoader(data, batch_size=4), optimizer, meta_labels, CPU, 1, 1,
                                     precision=precision_for("bf16", CPU))
    assert 0 < loss < 10 and 0 <= accuracy <= 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()) if a.ndim > 1)


def test_the_progress_bar_never_shows_a_stale_step_count_beside_the_loss(capsys):
    model = _model(share_type="layer4", ensemble=2, meta=2, with_random=False, dtype=torch.float32)
    data = TensorDataset(torch.randn(12, 3, 16, 16), torch.tensor([0, 1, 2] * 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    train_one_epoch(model, DataLoader(data, batch_size=4), optimizer, torch.tensor([[0, 1, 1], [1, 0, 1]]), CPU, 1, 1,
                    precision=precision_for("off", CPU))
    shown = [s for s in capsys.readouterr().out.replace("\n", "\r").split("\r") if "loss" in s]
    assert shown and all("3/3" in s for s in shown), shown


def test_unknown_amp_is_a_usage_error(small_digits_root, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_main(tiny_args(small_digits_root, tmp_path, "--amp", "fp8"))
    assert exit_info.value.code == 2
    assert "--amp" in capsys.readouterr().err
    assert not (tmp_path / "epochs").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sharding_over_gpus_gathers_on_the_first():
    count = torch.cuda.device_count()
    devices = [torch.device("cuda", i % count) for i in range(max(2, count))]
    reference = _model(ensemble=5, dtype=torch.float32)
    sharded = copy.deepcopy(reference)
    prepare_model(sharded, devices, "loop")
    images = torch.randn(4, 3, 32, 32)
    reference.eval(), sharded.eval()
    # cuDNN's TF32 convolutions (PyTorch's default) round to 10 bits; compare the gather in fp32.
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        got = sharded(images.to(devices[0]))
        expected = reference(images)
    assert got.device == devices[0]
    torch.testing.assert_close(got.cpu(), expected, atol=1e-4, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_step_on_the_gpu(amp):
    device = torch.device("cuda")
    model = _model(ensemble=4, meta=2, with_random=False, dtype=torch.float32)
    prepare_model(model, [device], "grouped", channels_last=True)
    images, targets = torch.randn(8, 3, 64, 64, device=device), torch.randint(0, 2, (8, 4), device=device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    precision = precision_for(amp, device)
    losses = []
    for _ in range(5):
        with precision.autocast():
            loss = F.cross_entropy(model(images).flatten(0, 1).float(), targets.flatten())
        precision.step(loss, optimizer)
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_moving_a_sharded_model_to_the_gpu_moves_its_plan():
    model = _model(ensemble=3, dtype=torch.float32).eval()
    prepare_model(model, [CPU, CPU], "grouped")
    model.cuda()
    assert {device.type for device, _ in model.shards} == {"cuda"}
    assert model(torch.randn(2, 3, 32, 32, device="cuda")).device.type == "cuda"
