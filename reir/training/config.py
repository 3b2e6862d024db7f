"""What a training run is configured by: :class:`TrainConfig`, one typed field per ``train.py`` flag.

Each field carries its flag's help, choices and group, so the command line is generated from
the dataclass (:func:`add_flags`) and a configuration built in Python is checked by the same
rules as one parsed from flags. The resolved configuration of a run is saved beside its outputs
(``statistics/<save name>_config.json``) and loads back with :meth:`TrainConfig.load`, or
``reir train --config``, which repeats the run with the flags given beside it changed.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

from reir.argtypes import csv_ints, gpu_id_list, non_negative_int, positive_int
from reir.data import DATA_NAMES
from reir.errors import UsageError
from reir.fileio import read_json
from reir.model.branches import BATCHING_MODES
from reir.model.meta_labels import LABEL_TYPES
from reir.model.heads import HEADS
from reir.model.network import MODEL_TYPES, SHARE_TYPES, ModelConfig
from reir.training.losses import PAIR_LOSSES
from reir.training.precision import AMP_DTYPES
from reir.training.recipe import RECIPES

GROUPS = {"original": "flags of the original train.py", "extra": "REIR extras",
          "heads": "branch heads and loss terms (defaults: the original's)",
          "speed": "speed and scale-out (none changes what is computed in fp32)"}
MODEL_FLAGS = ("model_type", "share_type", "ensemble_size", "meta_class_size")
# The command-line parser of each kind of list field, and its inverse for the checks.
LIST_PARSERS = {"recalls": csv_ints, "gpu_ids": gpu_id_list}


def flag(default: Any, help: str, group: str = "extra", choices=None, minimum: int | None = None,
         metavar: str | None = None):
    """A field that is also a ``--flag``; list defaults are copied per instance."""
    metadata = {"help": help, "group": group, "choices": choices, "minimum": minimum, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class TrainConfig:
    # flags of the original train.py, with its defaults
    data_name: str = flag("car", "dataset name", "original", DATA_NAMES)
    crop_type: str = flag("uncropped", "crop to the bounding box (car, cub and custom only)", "original",
                          ("uncropped", "cropped"))
    label_type: str = flag("fixed", "meta labels: fixed (distinct code words) or random", "original", LABEL_TYPES)
    recalls: list[int] = flag([1, 2, 4, 8], "selected recalls", "original")
    model_type: str = flag("resnet18", "backbone type", "original", MODEL_TYPES)
    share_type: str = flag("layer1", "last shared module", "original", SHARE_TYPES)
    with_random: bool = flag(False, "random branch weights in training", "original")
    load_ids: bool = flag(False, "reuse saved meta-class ids", "original")
    batch_size: int = flag(10, "train batch size", "original", minimum=1)
    num_epochs: int = flag(20, "train epochs number", "original", minimum=1)
    ensemble_size: int = flag(48, "ensemble model size", "original", minimum=1)
    meta_class_size: int = flag(12, "meta class size", "original", minimum=1)
    gpu_ids: list[int] = flag([0, 1], "selected GPUs", "original")
    # REIR extras
    weights: str = flag("imagenet", "backbone init: imagenet, none (random) or a state-dict file")
    recipe: str = flag("auto", "optimiser and schedule: auto = original with pretrained weights, scratch with "
                               "--weights none (docs/ACCURACY.md)", choices=RECIPES)
    seed: int | None = flag(None, "random seed (default: drawn at random and recorded)", minimum=0)
    image_size: int = flag(256, "images are resized to this square", minimum=1)
    data_path: str = flag("data", "folder holding the prepared datasets")
    output_dir: str = flag(".", "statistics/, epochs/ and results/ go here")
    num_workers: int = flag(4, "data loader processes", minimum=0)
    device: str | None = flag(None, "cpu, cuda or cuda:N (default: cuda if available; cuda:N uses that GPU only)")
    resume: str | None = flag(None, "continue from a checkpoint; auto: this save name's, if any "
                                    "(docs/RELIABILITY.md)", metavar="PATH|auto")
    nmi_every: int = flag(1, "compute NMI (k-means) every N epochs and at the last; 0 = never "
                             "(slow on SOP on CPU)", minimum=0)
    tensorboard: bool = flag(False, "also write TensorBoard event files per epoch to tensorboard/<save name>/ "
                                    "(needs the tensorboard package)")
    # branch heads and loss terms (docs/ACCURACY.md); the defaults are the original's
    head: str = flag("linear", "branch classifier: linear (the original's) or cosine (normalised weights and "
                               "features, logits = head_scale * cosine)", "heads", HEADS)
    head_scale: float = flag(16.0, "cosine head: the scale of its logits (1 / softmax temperature)", "heads")
    learn_scale: bool = flag(False, "cosine head: learn the scale (starting from --head_scale)", "heads")
    projection: int = flag(0, "a Linear(features -> N) + ReLU before each branch's classifier; 0 = none "
                              "(the embedding stays the branch's normalised logits)", "heads", minimum=0)
    pair_loss: str = flag("none", "a pairwise loss on the concatenated embedding beside the branches' "
                                  "cross-entropy: none or multisimilarity (with its miner)", "heads", PAIR_LOSSES)
    pair_weight: float = flag(1.0, "weight of --pair_loss against the mean cross-entropy", "heads")
    samples_per_class: int = flag(0, "batches of N images per class (positive pairs for --pair_loss); "
                                     "0 = images in random order", "heads", minimum=0)
    # speed and scale-out
    amp: str = flag("off", "autocast precision: bf16, fp16 (with loss scaling) or off (fp32)", "speed",
                    tuple(AMP_DTYPES))
    channels_last: bool = flag(False, "NHWC memory layout for convolutions", "speed")
    compile: bool = flag(False, "compile the model with torch.compile", "speed")
    branch_batching: str = flag("auto", "run branches one by one (loop) or as grouped convolutions; auto picks "
                                        "the measured faster one for the device", "speed", BATCHING_MODES)

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if meta["choices"] is not None and value not in meta["choices"]:
                raise UsageError(f"{f.name} {value!r} is not one of {', '.join(map(str, meta['choices']))}")
            if meta["minimum"] is not None and value is not None and (
                    isinstance(value, bool) or not isinstance(value, int) or value < meta["minimum"]):
                raise UsageError(f"{f.name} must be an integer >= {meta['minimum']}, not {value!r}")
            if f.name in LIST_PARSERS:  # the flag's rules and order (recalls sorted: the first picks the best epoch)
                try:
                    object.__setattr__(self, f.name, LIST_PARSERS[f.name](",".join(str(v) for v in value)))
                except (argparse.ArgumentTypeError, TypeError) as exc:
                    raise UsageError(f"{f.name}: {exc}") from None
        for name in ("head_scale", "pair_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or (
                    name == "head_scale" and value == 0):
                raise UsageError(f"{name} must be a number {'>' if name == 'head_scale' else '>='} 0, not {value!r}")

    @property
    def save_name(self) -> str:
        """The original's file stem, so its inference/ablation defaults keep their meaning."""
        randomness = "random" if self.with_random else "unrandom"
        return (f"{self.data_name}_{self.crop_type}_{self.label_type}_{randomness}_{self.share_type}_"
                f"{self.model_type}_{self.ensemble_size}_{self.meta_class_size}")

    @property
    def model(self) -> ModelConfig:
        return ModelConfig(self.model_type, self.share_type, self.ensemble_size, self.meta_class_size,
                           self.with_random, self.head, self.head_scale, self.learn_scale, self.projection)

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace, given: Iterable[str] = ()) -> "TrainConfig":
        """The configuration of parsed flags. With ``args.config`` (a recorded run's ``*_config.json``)
        its settings, overridden only by the flags in ``given``, those typed on the command line;
        ``resume`` is not taken from the record, so the recorded run is repeated, not continued."""
        values = vars(args).copy()
        path = values.pop("config", None)
        if path is None:
            return cls(**values)
        return cls.load(path).replace(resume=None, **{name: values[name] for name in given if name != "config"})

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        """A configuration saved by a run, to repeat or continue it."""
        saved = read_json(path, "configuration")
        unknown = sorted(set(saved) - {f.name for f in fields(cls)}) if isinstance(saved, dict) else ["(not an object)"]
        if unknown:
            raise UsageError(f"configuration {path} has unknown settings {unknown}; pass a *_config.json "
                             "written by train.py")
        return cls(**saved)


def add_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """One ``--flag`` per :class:`TrainConfig` field (or per field in ``names``), in groups."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(GROUPS[meta["group"]])
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if isinstance(default, bool):
            groups[meta["group"]].add_argument(f"--{f.name}", action="store_true", help=meta["help"])
            continue
        parse = LIST_PARSERS.get(f.name) or {0: non_negative_int, 1: positive_int}.get(meta["minimum"])
        parse = float if isinstance(default, float) else parse
        groups[meta["group"]].add_argument(f"--{f.name}", default=default, type=parse, choices=meta["choices"],
                                           metavar=meta["metavar"], help=meta["help"])
    return parser
