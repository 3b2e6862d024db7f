"""Running the branches: sharded over devices, and optionally batched into grouped convolutions.

``REIRNet.forward`` computes the shared stem and hands the branches to :func:`run_branches`.
Sharding is the original's model parallelism for any number of devices: the stem on the first
device, the branches split as evenly as possible over all of them, every branch output gathered
back on the first device. Devices are a list of ``torch.device``, so the split and gather run even
when every entry is the CPU.

Branch batching runs a whole group of branches as one network: the shared features are repeated
once per branch along the channels, every convolution becomes a grouped convolution over the
concatenated branch weights, and every BatchNorm one BatchNorm over the concatenated channels. The
maths is the loop's; only the kernel shapes change.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from .errors import ReirError

BATCHING_MODES = ("auto", "loop", "grouped")
# Measured with benchmarks/train_throughput.py --batching loop,grouped (docs/SCALING.md): on the CPU
# grouped training steps took 0.37x and 0.67x the loop's time (resnet18 x 12, 128 px, batch 16).
# CUDA has not been measured yet, so it keeps the loop until benchmarks/gpu_check.sh says otherwise.
DEFAULT_BATCHING = {"cpu": "grouped", "cuda": "loop"}
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The speed flags of train.py; none of them changes what is computed in fp32."""
    group = parser.add_argument_group("speed and scale-out")
    group.add_argument("--amp", default="off", choices=list(AMP_DTYPES),
                       help="autocast precision: bf16, fp16 (with loss scaling) or off (fp32)")
    group.add_argument("--channels_last", action="store_true", help="NHWC memory layout for convolutions")
    group.add_argument("--compile", action="store_true", help="compile the model with torch.compile")
    group.add_argument("--branch_batching", default="auto", choices=BATCHING_MODES,
                       help="run branches one by one (loop) or as grouped convolutions; auto picks the "
                            "measured faster one for the device")


def split_evenly(count: int, parts: int) -> list[range]:
    """``count`` items in ``parts`` contiguous ranges whose sizes differ by at most one."""
    base, extra = divmod(count, parts)
    ranges, start = [], 0
    for part in range(parts):
        stop = start + base + (1 if part < extra else 0)
        ranges.append(range(start, stop))
        start = stop
    return ranges


def shard_branches(model: nn.Module, devices: list[torch.device]) -> list[tuple[torch.device, range]]:
    """Place the stem on ``devices[0]`` and the branches evenly over ``devices``; returns the plan."""
    if not devices:
        raise ReirError("no device to place the model on; list at least one in --gpu_ids", 2)
    devices = [torch.device(d) for d in devices]
    plan = [(device, group) for device, group in zip(devices, split_evenly(len(model.branches), len(devices)))
            if len(group)]
    model.stem.to(devices[0])
    for device, group in plan:
        for index in group:
            model.branches[index].to(device)
    model.shards = plan
    return plan


def resolve_batching(mode: str, device: torch.device) -> str:
    return DEFAULT_BATCHING.get(torch.device(device).type, "loop") if mode == "auto" else mode


def run_branches(model: nn.Module, shared: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Every branch's logits ``[batch, ensemble, meta]`` on the stem's device."""
    plan = model.shards or [(shared.device, range(len(model.branches)))]
    outputs = []
    for device, group in plan:
        features = shared.to(device, non_blocking=True)
        group_weights = None if weights is None else weights[:, group.start:group.stop].to(device)
        branches = [model.branches[i] for i in group]
        run = grouped_branches if model.branch_batching == "grouped" else loop_branches
        outputs.append(run(branches, features, group_weights).to(shared.device, non_blocking=True))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


def loop_branches(branches: list[nn.Module], features: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    outputs = []
    for index, branch in enumerate(branches):
        scaled = features if weights is None else features * weights[:, index].view(-1, 1, 1, 1)
        outputs.append(branch(scaled))
    return torch.stack(outputs, dim=1)


def grouped_branches(branches: list[nn.Module], features: torch.Tensor,
                     weights: torch.Tensor | None) -> torch.Tensor:
    """The loop's result from one grouped network: ``[batch, len(branches), meta]``."""
    count = len(branches)
    stacked = features.unsqueeze(1).expand(-1, count, -1, -1, -1)
    if weights is not None:
        stacked = stacked * weights.view(*weights.shape, 1, 1, 1)
    x = stacked.reshape(features.shape[0], count * features.shape[1], *features.shape[2:])
    if features.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous(memory_format=torch.channels_last)
    for layers in zip(*branches):
        x = _grouped(list(layers), x)
    return x


def _grouped(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """One layer of every branch applied to its block of channels of ``x``."""
    first = layers[0]
    if isinstance(first, nn.Conv2d):
        weight = torch.cat([m.weight for m in layers])
        bias = None if first.bias is None else torch.cat([m.bias for m in layers])
        return F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, first.groups * len(layers))
    if isinstance(first, nn.BatchNorm2d):
        return _grouped_batch_norm(layers, x)
    if isinstance(first, nn.Sequential):
        for inner in zip(*layers):
            x = _grouped(list(inner), x)
        return x
    if isinstance(first, (BasicBlock, Bottleneck)):
        return _grouped_block(layers, x)
    if isinstance(first, nn.Linear):
        inputs = x.view(x.shape[0], len(layers), -1)
        weight = torch.stack([m.weight for m in layers])
        bias = torch.stack([m.bias for m in layers])
        return torch.einsum("bki,koi->bko", inputs, weight) + bias
    if isinstance(first, nn.Flatten):
        return x.flatten(1)
    if isinstance(first, (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        return first(x)  # channel-wise: the same for every branch
    raise ReirError(f"--branch_batching grouped cannot batch {type(first).__name__}; use --branch_batching loop")


def _grouped_batch_norm(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    first = layers[0]
    training = first.training or first.running_mean is None
    mean = torch.cat([m.running_mean for m in layers])
    var = torch.cat([m.running_var for m in layers])
    out = F.batch_norm(x, mean, var, torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers]),
                       training, first.momentum, first.eps)
    if first.training and first.track_running_stats:
        with torch.no_grad():  # F.batch_norm updated the concatenated copies; hand them back
            for m, m_mean, m_var in zip(layers, mean.chunk(len(layers)), var.chunk(len(layers))):
                m.running_mean.copy_(m_mean)
                m.running_var.copy_(m_var)
                m.num_batches_tracked.add_(1)
    return out


def _grouped_block(blocks: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock/Bottleneck forward, every layer grouped."""
    identity = x if blocks[0].downsample is None else _grouped([b.downsample for b in blocks], x)
    names = ["conv1", "bn1", "conv2", "bn2"] + (["conv3", "bn3"] if isinstance(blocks[0], Bottleneck) else [])
    out = x
    for position, name in enumerate(names):
        out = _grouped([getattr(b, name) for b in blocks], out)
        if name.startswith("bn") and position < len(names) - 1:
            out = F.relu(out)
    return F.relu(out + identity)


@dataclass
class Precision:
    """Autocast and loss scaling for one ``--amp`` choice on one device type."""

    device_type: str
    dtype: torch.dtype | None

    def __post_init__(self):
        fp16 = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=fp16)

    def autocast(self):
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward and optimizer step; fp16 scales the loss so small gradients do not underflow."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


def precision_for(amp: str, device: torch.device) -> Precision:
    return Precision(torch.device(device).type, AMP_DTYPES[amp])


def prepare_model(model: nn.Module, devices: list[torch.device], batching: str = "auto",
                  channels_last: bool = False) -> nn.Module:
    """Shard, pick the branch batching and memory layout; returns the same model, ready to train."""
    shard_branches(model, devices)
    model.branch_batching = resolve_batching(batching, devices[0])
    if channels_last:
        model.to(memory_format=torch.channels_last)
        model.register_forward_pre_hook(_to_channels_last)
    return model


def _to_channels_last(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])


def shard_devices(device: torch.device, gpu_ids: list[int]) -> list[torch.device]:
    """The devices to split the branches over: every listed GPU that exists, else ``device`` alone."""
    if device.type != "cuda":
        return [device]
    present = [i for i in gpu_ids if i < torch.cuda.device_count()]
    return [torch.device("cuda", i) for i in present] or [device]


def describe(model: nn.Module, amp: str, world_size: int = 1) -> str:
    """One line for the run log: where the branches live and how they run."""
    plan = model.shards or []
    if len({device for device, _ in plan}) <= 1 and len(plan) <= 1:
        where = f"device {plan[0][0] if plan else next(model.parameters()).device}"
    else:
        where = "branches on " + ", ".join(f"{device} ({len(group)})" for device, group in plan)
    extras = [f"{model.branch_batching} branches", f"amp {amp}"]
    if world_size > 1:
        extras.append(f"{world_size} processes")
    return f"{where}, " + ", ".join(extras)
