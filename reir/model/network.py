"""The REIR network: a shared ResNet stem feeding many independent branches.

Each branch is its own copy of the ResNet layers after ``share_type`` plus global
average pooling and a ``Linear(features -> meta_class_size)``. Its logits,
L2-normalised, are that branch's slice of the embedding. The model also owns how its
branches run: on which devices (``shard``), one by one or grouped (``branch_batching``,
see reir/model/branches.py), and in which memory layout (``use_channels_last``).
"""

from __future__ import annotations

import copy
import os
import urllib.error
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from reir.errors import ReirError
from reir.model.branches import RUNNERS
from reir.model.heads import HEADS, CosineHead
from reir.model.sharding import split_evenly

MODEL_TYPES = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
SHARE_TYPES = ("none", "maxpool", "layer1", "layer2", "layer3", "layer4")
# The ResNet children in order; share_type names the last one that is shared.
_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_SHARED_UP_TO = {"none": 0, "maxpool": 4, "layer1": 5, "layer2": 6, "layer3": 7, "layer4": 8}


@dataclass(frozen=True)
class ModelConfig:
    model_type: str = "resnet18"
    share_type: str = "layer1"
    ensemble_size: int = 48
    meta_class_size: int = 12
    with_random: bool = False
    # The branch head (docs/ACCURACY.md): the original's linear classifier, or a cosine one whose
    # logits are head_scale times the cosine of features and class weights; learn_scale trains the
    # scale. projection > 0 puts a Linear(features -> projection) + ReLU before the head.
    head: str = "linear"
    head_scale: float = 16.0
    learn_scale: bool = False
    projection: int = 0


def branch_head(in_features: int, config: ModelConfig) -> list[nn.Module]:
    """The layers after pooling: an optional projection, then the meta-class classifier."""
    if config.head not in HEADS:
        raise ReirError(f"unknown head {config.head!r}; choose one of {', '.join(HEADS)}", 2)
    layers: list[nn.Module] = []
    if config.projection:
        layers += [nn.Linear(in_features, config.projection), nn.ReLU()]
        in_features = config.projection
    if config.head == "cosine":
        return layers + [CosineHead(in_features, config.meta_class_size, config.head_scale, config.learn_scale)]
    return layers + [nn.Linear(in_features, config.meta_class_size)]


class Branch(nn.Sequential):
    """The unshared ResNet layers, pooling and a meta-class classifier."""

    def __init__(self, layers: list[nn.Module], head: list[nn.Module]):
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *head)


class REIRNet(nn.Module):
    def __init__(self, backbone: nn.Module, config: ModelConfig, branch_batching: str = "loop"):
        super().__init__()
        self.config = config
        children = [getattr(backbone, name) for name in _STAGES]
        cut = _SHARED_UP_TO[config.share_type]
        self.stem = nn.Sequential(*children[:cut])
        in_features = backbone.fc.in_features
        rest = children[cut:]
        self.branches = nn.ModuleList(
            Branch([copy.deepcopy(m) for m in rest], branch_head(in_features, config))
            for _ in range(config.ensemble_size))
        self.branch_batching = branch_batching
        self.channels_last = False
        self._shard_groups = [range(config.ensemble_size)]

    @property
    def branch_batching(self) -> str:
        """``loop`` runs the branches one by one, ``grouped`` as one network of grouped convolutions."""
        return self._branch_batching

    @branch_batching.setter
    def branch_batching(self, mode: str) -> None:
        if mode not in RUNNERS:
            raise ReirError(f"unknown branch batching {mode!r}; choose one of {', '.join(RUNNERS)}", 2)
        self._branch_batching = mode

    def shard(self, devices: list[torch.device]) -> REIRNet:
        """The stem on ``devices[0]``, the branches split evenly over ``devices``: the original's model parallelism."""
        if not devices:
            raise ReirError("no device to place the model on; list at least one in --gpu_ids", 2)
        devices = [torch.device(d) for d in devices]
        groups = [group for group in split_evenly(len(self.branches), len(devices)) if len(group)]
        self.stem.to(devices[0])
        for device, group in zip(devices, groups):
            for index in group:
                self.branches[index].to(device)
        self._shard_groups = groups
        return self

    @property
    def shards(self) -> list[tuple[torch.device, range]]:
        """Each group of branches with the device its parameters are on now, so the plan follows ``.to()``."""
        return [(next(self.branches[group.start].parameters()).device, group) for group in self._shard_groups]

    def use_channels_last(self) -> REIRNet:
        """NHWC weights and inputs: the same results, faster convolutions on many devices."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of every branch, shape ``[batch, ensemble_size, meta_class_size]``, on the stem's device."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        shared = self.stem(images)
        weights = self.branch_weights(shared.shape[0], shared.device, shared.dtype)
        run = RUNNERS[self.branch_batching]
        outputs = []
        for device, group in self.shards:
            features = shared.to(device, non_blocking=True)
            group_weights = None if weights is None else weights[:, group.start:group.stop].to(device)
            branches = [self.branches[i] for i in group]
            outputs.append(run(branches, features, group_weights).to(shared.device, non_blocking=True))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def branch_weights(self, batch: int, device, dtype) -> torch.Tensor | None:
        """``[batch, ensemble]`` branch weights: training with ``with_random`` only.

        As in the original, one softmax(U(0,1)) vector is drawn per forward pass and every image
        of the batch shares it. Evaluation stays unweighted (the original weights it too, which makes
        its evaluation random: README, "What differs from the original").
        """
        if not (self.training and self.config.with_random):
            return None
        uniform = torch.rand(self.config.ensemble_size, device=device)
        return torch.softmax(uniform, dim=0).to(dtype).expand(batch, -1)


def embedding_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Each branch's output L2-normalised: ``[batch, ensemble, meta]``."""
    return F.normalize(logits.float(), dim=-1)


def _weights_enum(model_type: str):
    return models.get_model_weights(model_type).IMAGENET1K_V1


def build_backbone(model_type: str, weights: str = "imagenet") -> nn.Module:
    """A torchvision ResNet; ``weights`` is ``imagenet``, ``none`` or a state-dict path."""
    if model_type not in MODEL_TYPES:
        raise ReirError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}", 2)
    if weights == "imagenet":
        enum = _weights_enum(model_type)
        try:
            return models.get_model(model_type, weights=enum)
        except (urllib.error.URLError, OSError, RuntimeError) as exc:
            target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
            if isinstance(exc, RuntimeError) and "download" not in str(exc).lower() and target.exists():
                raise ReirError(f"ImageNet weights at {target} are corrupt; delete the file "
                                "and download it again, or use --weights none") from None
            raise ReirError(f"cannot download ImageNet weights {enum.url}; put that file at {target} "
                            "or use --weights none (random init)") from None
    backbone = models.get_model(model_type, weights=None)
    if weights == "none":
        return backbone
    state = load_state_dict_file(weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise ReirError(f"--weights {weights} is not a {model_type} state dict "
                        f"({len(missing)} missing, {len(unexpected)} unexpected keys); "
                        "pass a matching torchvision state dict or --weights none", 2)
    return backbone


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """A backbone state dict from safetensors or a torch file, never with pickle code execution."""
    if not Path(path).is_file():
        raise ReirError(f"--weights {path} does not exist; use imagenet, none or a state-dict file", 2)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a safe state dict"
        raise ReirError(f"--weights {path} cannot be loaded safely ({type(exc).__name__}); "
                        "pass a plain state dict (.pth with tensors only, or .safetensors)", 2) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ReirError(f"--weights {path} holds no state dict of tensors; pass a backbone state dict", 2)
    return state


def create_model(config: ModelConfig, weights: str = "imagenet") -> REIRNet:
    """The one factory for every backbone and sharing point."""
    if config.share_type not in SHARE_TYPES:
        raise ReirError(f"unknown share_type {config.share_type!r}; choose one of {', '.join(SHARE_TYPES)}", 2)
    if config.ensemble_size < 1 or config.meta_class_size < 2:
        raise ReirError("ensemble_size must be >= 1 and meta_class_size >= 2", 2)
    if config.head_scale <= 0 or config.projection < 0:
        raise ReirError("head_scale must be > 0 and projection >= 0; fix --head_scale or --projection", 2)
    return REIRNet(build_backbone(config.model_type, weights), config)


def count_parameters(config: ModelConfig) -> int:
    """Trainable parameters, built on the meta device: no memory, no download."""
    with torch.device("meta"):
        model = create_model(config, weights="none")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
