"""What a training run is configured by: :class:`TrainConfig`, one typed field per ``train.py`` flag.

Each field carries its flag's help, choices, group and the rule a resumed run applies to it
(:data:`reir.settings.RESUME_RULES`), so the command line is generated from the dataclass
(:func:`reir.cli.train.add_flags`), a configuration built in Python is checked by the same rules as one parsed
from flags, and a checkpoint is compared on exactly the settings that must match. The network's
settings are :class:`~reir.model.network.ModelConfig`'s fields, inherited, never declared twice.
The resolved configuration of a run is saved beside its outputs
(``statistics/<save name>_config.json``) and loads back with :meth:`TrainConfig.load`, or
``reir train --config``, which repeats the run with the flags given beside it changed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable
from dataclasses import Field, dataclass, fields
from pathlib import Path
from typing import Any

from reir.argtypes import csv_ints, gpu_id_list
from reir.data import DATA_NAMES
from reir.errors import UsageError
from reir.fileio import read_json
from reir.model.branches import BATCHING_MODES
from reir.model.meta_labels import LABEL_TYPES
from reir.model.network import ModelConfig
from reir.settings import MAY_CHANGE, MUST_MATCH, OUTPUT_ONLY, check_settings, setting
from reir.training.losses import PAIR_LOSSES
from reir.training.precision import AMP_DTYPES
from reir.training.recipe import RECIPES

NETWORK_SETTINGS = tuple(f.name for f in fields(ModelConfig))
MODEL_FLAGS = ("model_type", "share_type", "ensemble_size", "meta_class_size")
# The command-line parser of each kind of list field, and its inverse for the checks.
LIST_PARSERS = {"recalls": csv_ints, "gpu_ids": gpu_id_list}

def flag(default: Any, help: str, resume: str, group: str = "extra", choices=None, minimum: float | None = None,
         metavar: str | None = None):
    """A setting that is also a flag, with the rule a resumed run applies to it (one of
    :data:`reir.settings.RESUME_RULES`)."""
    return setting(default, help, choices=choices, minimum=minimum, metavar=metavar, group=group, resume=resume)


def resume_rule(declared: Field) -> str | None:
    """How a resumed run treats a setting: the rule its field declares (the network's settings declare theirs on
    :class:`ModelConfig`), ``None`` for a field that declares none (a test fails on one)."""
    return declared.metadata.get("resume")


@dataclass(frozen=True)
class TrainConfig(ModelConfig):
    """A training run's settings: the network's (inherited from :class:`ModelConfig`, declared there once) and
    the run's own below."""

    # flags of the original train.py, with its defaults (its model flags are ModelConfig's)
    data_name: str = flag("car", "dataset name", MUST_MATCH, "original", DATA_NAMES)
    crop_type: str = flag("uncropped", "crop to the bounding box (car, cub and custom only)", MUST_MATCH, "original",
                          ("uncropped", "cropped"))
    label_type: str = flag("fixed", "meta labels: fixed (distinct code words) or random", MUST_MATCH, "original",
                           LABEL_TYPES)
    # the first recall picks the best epoch, whose model and database are kept
    recalls: list[int] = flag([1, 2, 4, 8], "selected recalls", MUST_MATCH, "original")
    load_ids: bool = flag(False, "reuse saved meta-class ids", MUST_MATCH, "original")
    batch_size: int = flag(10, "train batch size", MUST_MATCH, "original", minimum=1)
    num_epochs: int = flag(20, "train epochs number", MUST_MATCH, "original", minimum=1)
    gpu_ids: list[int] = flag([0, 1], "selected GPUs", MAY_CHANGE, "original")
    # REIR extras
    weights: str = flag("imagenet", "backbone init: imagenet, none (random) or a state-dict file", MUST_MATCH)
    recipe: str = flag("auto", "optimiser and schedule: auto = original with pretrained weights, scratch with "
                               "random ones (docs/ACCURACY.md)", MUST_MATCH, choices=RECIPES)
    seed: int | None = flag(None, "random seed (default: drawn at random and recorded)", MUST_MATCH, minimum=0)
    image_size: int = flag(256, "images are resized to this square", MUST_MATCH, minimum=1)
    data_path: str = flag("data", "folder holding the prepared datasets", MUST_MATCH)
    output_dir: str = flag(".", "statistics/, epochs/ and results/ go here", OUTPUT_ONLY)
    num_workers: int = flag(4, "data loader processes", MAY_CHANGE, minimum=0)
    device: str | None = flag(None, "cpu, cuda or cuda:N (default: cuda if available; cuda:N uses that GPU only)",
                              MAY_CHANGE)
    resume: str | None = flag(None, "continue from a checkpoint; auto: this save name's, if any "
                                    "(docs/RELIABILITY.md)", MAY_CHANGE, metavar="PATH|auto")
    nmi_every: int = flag(1, "compute NMI (k-means) every N epochs and at the last; 0 = never "
                             "(slow on SOP on CPU)", OUTPUT_ONLY, minimum=0)
    tensorboard: bool = flag(False, "also write TensorBoard event files per epoch to tensorboard/<save name>/ "
                                    "(needs the tensorboard package)", OUTPUT_ONLY)
    # loss terms (docs/ACCURACY.md); the defaults are the original's (the branch heads are ModelConfig's)
    pair_loss: str = flag("none", "a pairwise loss on the concatenated embedding beside the branches' "
                                  "cross-entropy: none or multisimilarity (with its miner)", MUST_MATCH, "heads",
                          PAIR_LOSSES)
    pair_weight: float = flag(1.0, "weight of the pair loss against the mean cross-entropy", MUST_MATCH, "heads",
                              minimum=0.0)
    samples_per_class: int = flag(0, "batches of N images per class (positive pairs for the pair loss); "
                                     "0 = images in random order", MUST_MATCH, "heads", minimum=0)
    # speed and scale-out
    amp: str = flag("off", "autocast precision: bf16, fp16 (with loss scaling) or off (fp32)", MUST_MATCH, "speed",
                    tuple(AMP_DTYPES))
    channels_last: bool = flag(False, "NHWC memory layout for convolutions", MAY_CHANGE, "speed")
    compile: bool = flag(False, "compile the model with torch.compile", MAY_CHANGE, "speed")
    branch_batching: str = flag("auto", "run branches one by one (loop) or as grouped convolutions; auto picks "
                                        "the measured faster one for the device", MAY_CHANGE, "speed", BATCHING_MODES)

    def __post_init__(self):
        super().__post_init__()  # the network's settings
        check_settings(self, tuple(f for f in fields(self) if f.name not in NETWORK_SETTINGS))
        for name, parse in LIST_PARSERS.items():  # the flag's rules and order (recalls sorted)
            try:
                object.__setattr__(self, name, parse(",".join(str(v) for v in getattr(self, name))))
            except (argparse.ArgumentTypeError, TypeError) as exc:
                raise UsageError(f"{name}: {exc}") from None

    @property
    def save_name(self) -> str:
        """The original's file stem, so its inference/ablation defaults keep their meaning."""
        randomness = "random" if self.with_random else "unrandom"
        return (f"{self.data_name}_{self.crop_type}_{self.label_type}_{randomness}_{self.share_type}_"
                f"{self.model_type}_{self.ensemble_size}_{self.meta_class_size}")

    @property
    def model(self) -> ModelConfig:
        """The network's settings alone."""
        return ModelConfig(**{name: getattr(self, name) for name in NETWORK_SETTINGS})

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_args(cls, args: argparse.Namespace, given: Iterable[str] = ()) -> TrainConfig:
        """The configuration of parsed flags. With ``args.config`` (a recorded run's ``*_config.json``)
        its settings, overridden only by the flags in ``given``, those typed on the command line;
        ``resume`` is not taken from the record, so the recorded run is repeated, not continued."""
        values = vars(args).copy()
        path = values.pop("config", None)
        if path is None:
            return cls(**values)
        return cls.load(path).replace(resume=None, **{name: values[name] for name in given if name != "config"})

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """A configuration saved by a run, to repeat or continue it."""
        saved = read_json(path, "configuration")
        unknown = sorted(set(saved) - {f.name for f in fields(cls)}) if isinstance(saved, dict) else ["(not an object)"]
        if unknown:
            raise UsageError(f"configuration {path} has unknown settings {unknown}; pass a *_config.json "
                             "written by train.py")
        return cls(**saved)
