"""The REIR network: a shared ResNet stem feeding many independent branches.

Each branch is its own copy of the ResNet layers after ``share_type`` plus global
average pooling and a ``Linear(features -> meta_class_size)``. Its logits,
L2-normalised, are that branch's slice of the embedding. The model also owns how its
branches run: on which devices (``shard``), one by one or grouped (``branch_batching``,
see reir/model/branches.py), and in which memory layout (``use_channels_last``).
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from reir.errors import ReirError, UsageError
from reir.model.branches import RUNNERS
from reir.model.heads import HEADS, CosineHead
from reir.model.sharding import split_evenly
from reir.settings import MUST_MATCH, check_settings, setting

log = logging.getLogger(__name__)

MODEL_TYPES = ("resnet18", "resnet34", "resnet50", "resnext50_32x4d")
SHARE_TYPES = ("none", "maxpool", "layer1", "layer2", "layer3", "layer4")
# The ResNet children in order; share_type names the last one that is shared.
_STAGES = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
_SHARED_UP_TO = {"none": 0, "maxpool": 4, "layer1": 5, "layer2": 6, "layer3": 7, "layer4": 8}


@dataclass(frozen=True)
class ModelConfig:
    """The network's settings, each declared once with its help and checks (:mod:`reir.settings`): a training
    configuration extends this class, so its command line and checks are these fields' own. Every one must
    match when a training run resumes: a checkpoint holds the weights of one network."""

    model_type: str = setting("resnet18", "backbone type", choices=MODEL_TYPES, group="original", resume=MUST_MATCH)
    share_type: str = setting("layer1", "last shared module", choices=SHARE_TYPES, group="original",
                              resume=MUST_MATCH)
    ensemble_size: int = setting(48, "ensemble model size", minimum=1, group="original", resume=MUST_MATCH)
    meta_class_size: int = setting(12, "meta class size", minimum=2, group="original", resume=MUST_MATCH)
    with_random: bool = setting(False, "random branch weights in training", group="original", resume=MUST_MATCH)
    # The branch head (docs/ACCURACY.md): the original's linear classifier, or a cosine one whose
    # logits are head_scale times the cosine of features and class weights; learn_scale trains the
    # scale. projection > 0 puts a Linear(features -> projection) + ReLU before the head.
    head: str = setting("linear", "branch classifier: linear (the original's) or cosine (normalised weights and "
                                  "features, logits = head_scale * cosine)", choices=HEADS, group="heads",
                        resume=MUST_MATCH)
    head_scale: float = setting(16.0, "cosine head: the scale of its logits (1 / softmax temperature)", above=0.0,
                                group="heads", resume=MUST_MATCH)
    learn_scale: bool = setting(False, "cosine head: learn the scale (starting from head_scale)", group="heads",
                                resume=MUST_MATCH)
    projection: int = setting(0, "a Linear(features -> N) + ReLU before each branch's classifier; 0 = none "
                                 "(the embedding stays the branch's normalised logits)", minimum=0, group="heads",
                              resume=MUST_MATCH)

    def __post_init__(self):
        check_settings(self, fields(ModelConfig))


def branch_head(in_features: int, config: ModelConfig) -> list[nn.Module]:
    """The layers after pooling: an optional projection, then the meta-class classifier."""
    layers: list[nn.Module] = []
    if config.projection:
        layers += [nn.Linear(in_features, config.projection), nn.ReLU()]
        in_features = config.projection
    if config.head == "cosine":
        return [*layers, CosineHead(in_features, config.meta_class_size, config.head_scale, config.learn_scale)]
    return [*layers, nn.Linear(in_features, config.meta_class_size)]


class Branch(nn.Sequential):
    """The unshared ResNet layers, pooling and a meta-class classifier."""

    def __init__(self, layers: list[nn.Module], head: list[nn.Module]):
        super().__init__(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *head)


class REIRNet(nn.Module):
    def __init__(self, backbone: models.ResNet, config: ModelConfig, branch_batching: str = "loop"):
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
        # Where the backbone's starting weights came from (:func:`load_backbone`), for the run's record.
        self.initial_weights: dict = {}
        self.channels_last = False
        self._shard_groups = [range(config.ensemble_size)]

    @property
    def branch_batching(self) -> str:
        """``loop`` runs the branches one by one, ``grouped`` as one network of grouped convolutions."""
        return self._branch_batching

    @branch_batching.setter
    def branch_batching(self, mode: str) -> None:
        if mode not in RUNNERS:
            raise UsageError(f"unknown branch batching {mode!r}; choose one of {', '.join(RUNNERS)}")
        self._branch_batching = mode

    def shard(self, devices: list[torch.device]) -> REIRNet:
        """The stem on ``devices[0]``, the branches split evenly over ``devices``: the original's model parallelism."""
        if not devices:
            raise UsageError("no device to place the model on; list at least one in `gpu_ids`")
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


def imagenet_weights_file(model_type: str) -> Path:
    """Where torchvision's weights API keeps the ImageNet weights, and where an offline machine needs them:
    ``$TORCH_HOME/hub/checkpoints/<the file name of the weights' URL>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(_weights_enum(model_type).url)


def _imagenet_file(model_type: str) -> Path:
    """The cached ImageNet weights, downloaded (hash-checked, as torchvision does) when absent."""
    url, target = _weights_enum(model_type).url, imagenet_weights_file(model_type)
    if not target.is_file():
        published = torch.hub.HASH_REGEX.search(target.name)
        log.info("Downloading %s to %s", url, target)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(target), published.group(1) if published else None)
        except Exception as exc:  # noqa: BLE001 - every failure to fetch has the same remedy
            reason = (str(exc).splitlines() or [type(exc).__name__])[0][:120]
            raise ReirError(f"cannot download ImageNet weights {url} ({reason}); put that file at {target} "
                            "or use `weights` none (random init)") from None
    return target


def _read_state_dict(path: Path) -> tuple[dict, str]:
    """The object a weights file holds and the SHA-256 of the very bytes it was read from.

    Safetensors, or a torch file read with ``weights_only=True``: never code from a pickle. torchvision's
    own loader unpickles its cache file in full, so the ImageNet file is read here too.
    """
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        from safetensors.torch import load as load_safetensors

        state = load_safetensors(data)
    else:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state, hashlib.sha256(data).hexdigest()


def _imagenet_backbone(model_type: str) -> tuple[nn.Module, dict]:
    enum, target = _weights_enum(model_type), _imagenet_file(model_type)
    try:
        state, digest = _read_state_dict(target)
        backbone = models.get_model(model_type, weights=None)  # torchvision's 1000 ImageNet classes
        backbone.load_state_dict(state)
    except Exception as exc:  # noqa: BLE001 - unreadable or not this backbone's: either way the file is wrong
        raise ReirError(f"ImageNet weights at {target} are corrupt or not {model_type}'s "
                        f"({type(exc).__name__}); delete the file and download it again, or use `weights` none"
                        ) from None
    published = torch.hub.HASH_REGEX.search(target.name)
    origin = {"weights": "imagenet", "torchvision": f"{type(enum).__name__}.{enum.name}", "url": enum.url,
              "file": str(target.resolve()), "sha256": digest,
              "published_file": published is not None and digest.startswith(published.group(1))}
    if not origin["published_file"]:
        log.warning("ImageNet weights at %s are not torchvision's published file (SHA-256 %s..., the URL names "
                    "%s): training starts from whatever weights it holds", target, digest[:8],
                    published.group(1) if published else "no hash")
    return backbone, origin


def load_backbone(model_type: str, weights: str = "imagenet") -> tuple[nn.Module, dict]:
    """A torchvision ResNet and where its weights came from (recorded with a run).

    ``weights`` is ``imagenet`` (torchvision's cache, downloaded when absent), ``none`` (random) or a
    state-dict file; the record names the source, the file and the SHA-256 of its bytes.
    """
    if model_type not in MODEL_TYPES:
        raise UsageError(f"unknown model_type {model_type!r}; choose one of {', '.join(MODEL_TYPES)}")
    if weights == "imagenet":
        return _imagenet_backbone(model_type)
    backbone = models.get_model(model_type, weights=None)
    if weights == "none":
        return backbone, {"weights": "none"}
    state, digest = load_state_dict_file(weights)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    try:
        missing, unexpected = backbone.load_state_dict(state, strict=False)
    except RuntimeError:  # tensors of other shapes: another architecture's weights
        raise UsageError(f"`weights` {weights} is not a {model_type} state dict (its tensors have other shapes); "
                         "pass a matching torchvision state dict or `weights` none") from None
    missing = [k for k in missing if not k.startswith("fc.")]
    if missing or unexpected:
        raise UsageError(f"`weights` {weights} is not a {model_type} state dict "
                         f"({len(missing)} missing, {len(unexpected)} unexpected keys); "
                         "pass a matching torchvision state dict or `weights` none")
    return backbone, {"weights": weights, "file": str(Path(weights).resolve()), "sha256": digest}


def build_backbone(model_type: str, weights: str = "imagenet") -> nn.Module:
    """A torchvision ResNet; ``weights`` is ``imagenet``, ``none`` or a state-dict path."""
    return load_backbone(model_type, weights)[0]


def load_state_dict_file(path: str) -> tuple[dict[str, torch.Tensor], str]:
    """A backbone state dict from safetensors or a torch file, and the SHA-256 of the file's bytes."""
    if not Path(path).is_file():
        raise UsageError(f"`weights` {path} does not exist; use imagenet, none or a state-dict file")
    try:
        state, digest = _read_state_dict(Path(path))
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a safe state dict"
        raise UsageError(f"`weights` {path} cannot be loaded safely ({type(exc).__name__}); "
                         "pass a plain state dict (.pth with tensors only, or .safetensors)") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UsageError(f"`weights` {path} holds no state dict of tensors; pass a backbone state dict")
    return state, digest


def create_model(config: ModelConfig, weights: str = "imagenet") -> REIRNet:
    """The one factory for every backbone and sharing point (``config`` was checked when it was made)."""
    backbone, origin = load_backbone(config.model_type, weights)
    model = REIRNet(backbone, config)
    model.initial_weights = origin
    return model


def count_parameters(config: ModelConfig) -> int:
    """Trainable parameters, built on the meta device: no memory, no download."""
    with torch.device("meta"):
        model = create_model(config, weights="none")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
