"""How a group of branches runs: one after another (``loop``) or as one grouped network (``grouped``).

Grouped running treats a whole group of branches as one network: the shared features are repeated
once per branch along the channels, every convolution becomes a grouped convolution over the
concatenated branch weights, every BatchNorm one BatchNorm over the concatenated channels, and the
classifiers one batched matmul. The maths is the loop's; only the kernel shapes change.
"""

from __future__ import annotations

from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from reir.errors import ReirError, UsageError
from reir.model.heads import CosineHead, grouped_cosine

BATCHING_MODES = ("auto", "loop", "grouped")
# Measured with benchmarks/train_throughput.py (docs/SCALING.md): on an idle 2-core CPU the loop ran
# 1.63x grouped's images/s (resnet18 x 12, layer1 shared, 128 px), 2.26x (layer3 shared, 64 px) and
# 1.14x (the demo: layer4 shared, 48 heads, 32 px): oneDNN's dense convolutions beat its grouped ones
# and the loop needs no weight concatenation. On an H200 grouped ran 2.0x the loop's images/s in fp32
# and 3.6x in bf16 (resnet18 x 48, 256 px): there the loop's many small kernels are launch-bound.
DEFAULT_BATCHING = {"cpu": "loop", "cuda": "grouped"}

Layer = TypeVar("Layer", bound=nn.Module)


def resolve_batching(mode: str, device: torch.device) -> str:
    """``auto`` becomes the measured faster mode for the device type."""
    if mode not in BATCHING_MODES:
        raise UsageError(f"unknown branch batching {mode!r}; choose one of {', '.join(BATCHING_MODES)}")
    return DEFAULT_BATCHING.get(torch.device(device).type, "loop") if mode == "auto" else mode


def loop_branches(branches: list[nn.Module], features: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Each branch on its (optionally weighted) copy of the features: ``[batch, len(branches), meta]``."""
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


RUNNERS = {"loop": loop_branches, "grouped": grouped_branches}


def _grouped(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    """One layer of every branch applied to its block of channels of ``x``."""
    first = layers[0]
    if isinstance(first, nn.Conv2d):
        convolutions = _alike(layers, nn.Conv2d)
        weight = torch.cat([m.weight for m in convolutions])
        bias = None if first.bias is None else torch.cat([m.bias for m in convolutions if m.bias is not None])
        return F.conv2d(x, weight, bias, first.stride, first.padding, first.dilation, first.groups * len(layers))
    if isinstance(first, nn.BatchNorm2d):
        return _grouped_batch_norm(_alike(layers, nn.BatchNorm2d), x)
    if isinstance(first, nn.Sequential):
        for inner in zip(*layers):
            x = _grouped(list(inner), x)
        return x
    if isinstance(first, (BasicBlock, Bottleneck)):
        return _grouped_block(layers, x)
    if isinstance(first, nn.Linear):
        linears = _alike(layers, nn.Linear)
        inputs = x.view(x.shape[0], len(layers), -1)
        weight = torch.stack([m.weight for m in linears])
        bias = torch.stack([m.bias for m in linears])
        return torch.einsum("bki,koi->bko", inputs, weight) + bias
    if isinstance(first, CosineHead):
        return grouped_cosine(_alike(layers, CosineHead), x)
    if isinstance(first, nn.Flatten):
        return x.flatten(1)
    if isinstance(first, (nn.ReLU, nn.MaxPool2d, nn.AdaptiveAvgPool2d)):
        return first(x)  # channel-wise: the same for every branch
    raise ReirError(f"`branch_batching` grouped cannot batch {type(first).__name__}; use `branch_batching` loop")


def _alike(layers: list[nn.Module], kind: type[Layer]) -> list[Layer]:
    """``layers`` (one per branch, copies of one layer) as the kind of the first."""
    alike = [layer for layer in layers if isinstance(layer, kind)]
    if len(alike) != len(layers):
        raise ReirError(f"branches differ at a {kind.__name__}; grouped branch batching needs alike branches")
    return alike


def _grouped_batch_norm(layers: list[nn.BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
    first = layers[0]
    means = [m.running_mean for m in layers if m.running_mean is not None]
    variances = [m.running_var for m in layers if m.running_var is not None]
    counts = [m.num_batches_tracked for m in layers if m.num_batches_tracked is not None]
    if len(means) < len(layers) or len(variances) < len(layers) or first.momentum is None:
        raise ReirError("grouped branch batching needs BatchNorm layers with running statistics and a fixed "
                        "momentum; batch the branches in a loop instead")
    mean, var = torch.cat(means), torch.cat(variances)
    out = F.batch_norm(x, mean, var, torch.cat([m.weight for m in layers]), torch.cat([m.bias for m in layers]),
                       first.training, first.momentum, first.eps)
    if first.training and first.track_running_stats:
        # F.batch_norm updated the concatenated copies; hand them back in a few multi-tensor kernels
        # rather than three per branch (on a GPU those tiny launches cost more than the maths).
        with torch.no_grad():
            torch._foreach_copy_(means, list(mean.chunk(len(layers))))
            torch._foreach_copy_(variances, list(var.chunk(len(layers))))
            torch._foreach_add_(counts, 1)
    return out


def _grouped_block(blocks: list[BasicBlock | Bottleneck], x: torch.Tensor) -> torch.Tensor:
    """torchvision's BasicBlock/Bottleneck forward, every layer grouped."""
    identity = x if blocks[0].downsample is None else _grouped([b.downsample for b in blocks], x)
    names = ["conv1", "bn1", "conv2", "bn2"] + (["conv3", "bn3"] if isinstance(blocks[0], Bottleneck) else [])
    out = x
    for position, name in enumerate(names):
        out = _grouped([getattr(b, name) for b in blocks], out)
        if name.startswith("bn") and position < len(names) - 1:
            out = F.relu(out)
    return F.relu(out + identity)
