"""The original REIR's model files (``epochs/<name>_model.pth``), read without running code from them.

The original saved its network's state dict with ``torch.save``: tensors under string keys, which
PyTorch's restricted loader reads without unpickling code. Over its history the original laid the
network out in three ways, told apart here by their keys:

- ``common_extractor.<i>`` + ``layer2..layer4.<branch>`` (layer1 shared, no share type);
- ``common_extractor.<i>`` + ``head.<branch>.<j>`` (conv1 … maxpool when nothing is shared) +
  ``layer1..layer4.<branch>`` for the unshared layers;
- ``common_extractor.<i>`` + ``individual_extractor.<branch>.<j>`` (the children after the shared one).

All three end in ``classifiers.<branch>`` and compute what :class:`REIRNet` computes (shared ResNet
children, per-branch children, global average pooling, a linear classifier), so every key maps onto
one REIR key; every key must map and every shape must match, or nothing is written.
"""

from __future__ import annotations

import logging
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from reir.data.registry import BENCHMARKS, IMAGENET_MEAN, IMAGENET_STD
from reir.errors import ReirError, UsageError
from reir.model.files import save_model
from reir.model.network import _SHARED_UP_TO, _STAGES, MODEL_TYPES, SHARE_TYPES, ModelConfig, create_model

log = logging.getLogger(__name__)

ORIGINAL_IMAGE_SIZE = 256  # the original resizes every image to 256 x 256
NORMALISATIONS = ("dataset", "imagenet")
# The configuration the original encodes in its file names.
_NAME = re.compile(
    r"(?P<data_name>[a-z0-9]+)_(?P<crop_type>uncropped|cropped)_(?P<label_type>fixed|random)_"
    rf"(?P<randomness>random|unrandom)_(?P<share_type>{'|'.join(SHARE_TYPES)})_"
    rf"(?P<model_type>{'|'.join(MODEL_TYPES)})_(?P<ensemble_size>\d+)_(?P<meta_class_size>\d+)")
_FILE_KINDS = ("_model", "_data_base")
_PER_STAGE = re.compile(r"(?P<stage>head|layer[1-4])\.(?P<branch>\d+)\.(?P<rest>.+)")
_SEQUENTIAL = re.compile(r"individual_extractor\.(?P<branch>\d+)\.(?P<child>\d+)\.(?P<rest>.+)")
_COMMON = re.compile(r"common_extractor\.(?P<child>\d+)\.(?P<rest>.+)")
_CLASSIFIER = re.compile(r"classifiers\.(?P<branch>\d+)\.(?P<rest>weight|bias)")
_HEAD_STAGES = 4  # conv1, bn1, relu, maxpool: the original's per-branch "head" when nothing is shared


def name_settings(path: str | Path) -> dict:
    """The configuration in an original file name, or ``{}`` when the name does not follow its pattern."""
    stem = Path(path).name.removesuffix(".pth")
    for kind in _FILE_KINDS:
        stem = stem.removesuffix(kind)
    match = _NAME.fullmatch(stem)
    if not match:
        return {}
    found = match.groupdict()
    found["with_random"] = found.pop("randomness") == "random"
    found["ensemble_size"], found["meta_class_size"] = int(found["ensemble_size"]), int(found["meta_class_size"])
    return found


def original_settings(path: str | Path, overrides: dict, normalisation: str = "dataset") -> dict:
    """Name settings, overridden by the given ones, plus image size and normalisation.

    ``dataset`` normalisation is the original's per-dataset mean/std (ImageNet's for a dataset REIR
    does not know); ``imagenet`` forces ImageNet's.
    """
    settings = {**name_settings(path), **{k: v for k, v in overrides.items() if v is not None}}
    benchmark = BENCHMARKS.get(settings.get("data_name", "")) if normalisation == "dataset" else None
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if benchmark is not None and benchmark.mean is not None and benchmark.std is not None:
        mean, std = benchmark.mean, benchmark.std
    settings["mean"], settings["std"] = list(mean), list(std)
    settings["image_size"] = ORIGINAL_IMAGE_SIZE
    settings.setdefault("with_random", False)
    return settings


def load_original(path: str | Path) -> Any:
    """A ``torch.save`` file read by PyTorch's restricted loader; a global it does not allow is refused, unrun."""
    path = Path(path)
    if not path.is_file():
        raise ReirError(f"{path} does not exist; pass the original's .pth file")
    if zipfile.is_zipfile(path):
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except Exception:  # noqa: BLE001 - a damaged archive: torch.load below names the problem
            unsafe = []
        if unsafe:
            raise _refusal(path, unsafe[0], len(unsafe) - 1)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        match = re.search(r"GLOBAL (\S+)", str(exc))
        raise _refusal(path, match.group(1) if match else "an object the restricted loader refuses", 0) from None
    except Exception as exc:  # noqa: BLE001 - any other failure: not a torch file we can read
        raise ReirError(f"{path} cannot be read as a torch file ({type(exc).__name__}); "
                        "pass a .pth the original saved") from None


def _refusal(path: Path, name: str, others: int) -> ReirError:
    more = f" (and {others} other globals)" if others else ""
    return ReirError(f"{path} holds {name}{more}, which could run code when loaded; refused, nothing written: "
                     "only plain tensors, numbers, strings and lists are read (save a plain state dict)")


def is_original_state_dict(content: Any) -> bool:
    return isinstance(content, dict) and any(isinstance(k, str) and k.startswith("classifiers.") for k in content)


def shared_children(keys: list[str], path: Path) -> int:
    """How many ResNet children the original's ``common_extractor`` holds (the sharing point)."""
    indices = {int(m["child"]) for m in map(_COMMON.fullmatch, keys) if m}
    if not indices:
        return 0
    last = max(indices)
    if last == 1:  # conv1 and bn1 carry weights, relu and maxpool none: the share type is maxpool
        return _SHARED_UP_TO["maxpool"]
    if last < 4 or last >= len(_STAGES):
        raise ReirError(f"{path}: common_extractor.{last} is no sharing point of a ResNet; "
                        "pass a model file the original saved")
    return last + 1


def state_dict_settings(state: dict[str, torch.Tensor], settings: dict, path: Path) -> dict:
    """Check the settings against what the keys say: branches, meta classes, sharing point."""
    keys = list(state)
    branches = sorted({int(m["branch"]) for m in map(_CLASSIFIER.fullmatch, keys) if m})
    if branches != list(range(len(branches))) or "classifiers.0.weight" not in state:
        raise ReirError(f"{path}: classifiers are numbered {branches[:5]}…, not 0..N-1; "
                        "pass a model file the original saved")
    share = next(s for s, cut in _SHARED_UP_TO.items() if cut == shared_children(keys, path))
    found = {"ensemble_size": len(branches), "meta_class_size": int(state["classifiers.0.weight"].shape[0]),
             "share_type": share}
    for key, value in found.items():
        if settings.get(key, value) != value:
            raise UsageError(f"{path} holds {key} {value} but its name or flags say {settings[key]}; "
                             f"drop the flag or pass `{key}` {value}")
    if "model_type" not in settings:
        raise UsageError(f"{path}: the file name does not say the backbone; pass `model_type` "
                         f"({', '.join(MODEL_TYPES)})")
    return {**settings, **found}


def map_state_dict(state: dict[str, torch.Tensor], config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    """The original's keys renamed to REIR's, every key placed and every shape checked."""
    with torch.device("meta"):
        model = create_model(config, weights="none")
    target = model.state_dict()
    classifier = [name for name, module in model.branches[0].named_children() if isinstance(module, nn.Linear)][-1]
    cut = _SHARED_UP_TO[config.share_type]
    mapped: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        name = _reir_key(key, cut, classifier, target)
        if name is None:
            raise ReirError(f"{path}: key {key!r} has no place in a {config.model_type} with share_type "
                            f"{config.share_type}; refused, nothing written (is `model_type` right?)")
        if name in mapped:
            raise ReirError(f"{path}: key {key!r} repeats the weights of another key ({name}); refused")
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ReirError(f"{path}: key {key!r} has shape {tuple(tensor.shape)}, a {config.model_type} needs "
                            f"{tuple(target[name].shape)}; pass the right `model_type`")
        mapped[name] = tensor.detach().to(target[name].dtype)
    for name in target:  # absent from files of PyTorch < 0.4.1; BatchNorm reads it only in training
        if name.endswith("num_batches_tracked") and name not in mapped:
            mapped[name] = torch.zeros((), dtype=target[name].dtype)
    missing = [k for k in target if k not in mapped]
    if missing:
        raise ReirError(f"{path} lacks the weights of {missing[0]} ({len(missing)} REIR keys unfilled); "
                        "pass a complete model file the original saved")
    return mapped


def _reir_key(key: str, cut: int, classifier: str, target: dict) -> str | None:
    """REIR's name for one original key, or ``None`` when it has none."""
    if match := _COMMON.fullmatch(key):
        return _existing(f"stem.{match['child']}.{match['rest']}", target) if int(match["child"]) < cut else None
    if match := _CLASSIFIER.fullmatch(key):
        return _existing(f"branches.{match['branch']}.{classifier}.{match['rest']}", target)
    if match := _SEQUENTIAL.fullmatch(key):
        return _existing(f"branches.{match['branch']}.{match['child']}.{match['rest']}", target)
    if match := _PER_STAGE.fullmatch(key):
        prefix, rest = f"branches.{match['branch']}", match["rest"]
        if match["stage"] == "head":
            child, _, rest = rest.partition(".")
            return _existing(f"{prefix}.{child}.{rest}", target) if cut == 0 and int(child) < _HEAD_STAGES else None
        position = _STAGES.index(match["stage"]) - cut
        if position < 0:
            return None
        # A stage kept whole (``layer2.<b>.<block>…``) or wrapped once more (``layer2.<b>.0.<block>…``).
        return (_existing(f"{prefix}.{position}.{rest}", target)
                or (_existing(f"{prefix}.{position}.{rest[2:]}", target) if rest.startswith("0.") else None))
    return None


def _existing(name: str, target: dict) -> str | None:
    return name if name in target else None


def convert_model(state: Any, path: str | Path, output: str | Path, overrides: dict | None = None,
                  normalisation: str = "dataset") -> Path:
    """A REIR model file from the original's state dict (already loaded with :func:`load_original`)."""
    path = Path(path)
    bad = (next((k for k, v in state.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))), None)
           if isinstance(state, dict) else type(state).__name__)
    if bad is not None:
        raise ReirError(f"{path} is no plain state dict ({bad!r} is not a tensor); refused, nothing written")
    settings = state_dict_settings(state, original_settings(path, overrides or {}, normalisation), path)
    config = ModelConfig(settings["model_type"], settings["share_type"], settings["ensemble_size"],
                         settings["meta_class_size"], settings["with_random"])
    weights = map_state_dict(state, config, path)
    info = {key: settings.get(key) for key in ("data_name", "crop_type", "mean", "std", "image_size")}
    info["converted_from"] = str(path.resolve())
    run_config = {**{k: v for k, v in settings.items() if k not in ("mean", "std")},
                  "save_name": path.name.removesuffix(".pth").removesuffix("_model")}
    return save_model(output, weights, config, run_config, info)


def converted_name(path: str | Path) -> Path:
    """Where the REIR equivalent of an original ``.pth`` goes: beside it, ``.safetensors``."""
    path = Path(path)
    return path.with_name(path.name.removesuffix(".pth") + ".safetensors")


def convert_model_beside(path: str | Path) -> Path:
    """Convert an original model file next to itself, for commands that find only the original's."""
    target = converted_name(path)
    convert_model(load_original(path), path, target)
    log.info("note: converted the original's model %s to %s (reir convert does this explicitly)", path, target)
    return target
