"""``reir train`` / ``train.py`` and ``reir params``: the command line of :mod:`reir.training.train`."""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable
from dataclasses import fields, replace
from typing import Any

import torch

from reir.argtypes import at_least, positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.cli.messages import flag_name
from reir.data.registry import BENCHMARKS
from reir.model.branches import resolve_batching
from reir.model.network import MODEL_TYPES, ModelConfig, count_parameters
from reir.settings import default_of
from reir.training.config import LIST_PARSERS, MODEL_FLAGS, TrainConfig
from reir.training.memory import HOST_OVERHEAD, estimate, gib
from reir.training.train import claim_run_outputs, train

# The title of each group of flags, named by a setting's ``group`` (reir.settings.setting).
GROUPS = {"original": "flags of the original train.py", "extra": "REIR extras",
          "heads": "branch heads and loss terms (defaults: the original's)",
          "speed": "speed and scale-out (none changes what is computed in fp32)"}


def add_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """One flag per :class:`TrainConfig` field (or per field in ``names``), in groups, from the fields' metadata."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in fields(TrainConfig):
        if names is not None and f.name not in names:
            continue
        meta = f.metadata
        if meta["group"] not in groups:
            groups[meta["group"]] = parser.add_argument_group(GROUPS[meta["group"]])
        default = default_of(f)
        if isinstance(default, bool):
            groups[meta["group"]].add_argument(flag_name(f.name), action="store_true", help=meta["help"])
            continue
        parse: Callable[[str], Any] = LIST_PARSERS.get(f.name) or (
            float if isinstance(default, float) else str if meta["minimum"] is None else at_least(meta["minimum"]))
        groups[meta["group"]].add_argument(flag_name(f.name), default=default, type=parse, choices=meta["choices"],
                                           metavar=meta["metavar"], help=meta["help"])
    return parser


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", add_help=add_help,
                            description="Train a REIR model (Randomized Ensembles for Image Retrieval).")
    parser.add_argument("--config", default=None, metavar="statistics/<name>_config.json",
                        help="repeat a recorded run: its settings (seed included); flags given beside it override "
                             "them and are recorded in the new run's configuration")
    add_flags(parser)
    return parser


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The settings typed on the command line, told apart from defaults by parsing again without any."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    # A command-line setting, not one of the run's: TrainConfig (and a recorded configuration) never holds it.
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the files an earlier run of this save name wrote with another seed")
    args = parser.parse_args(argv)
    overwrite = args.overwrite
    del args.overwrite
    config = TrainConfig.from_args(args, given_flags(parser, argv) - {"overwrite"})
    claim_run_outputs(config, overwrite, "--overwrite")
    train(config)
    return 0


def parameter_table(model: ModelConfig) -> str:
    """The original's table as Markdown: a row per backbone, a column per benchmark at the meta-class size
    its runs used, so that every cell README quotes is printed by one command."""
    columns = {name: info.original_meta_classes for name, info in BENCHMARKS.items() if info.original_meta_classes}
    lines = ["| backbone | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for backbone in MODEL_TYPES:
        cells = (count_parameters(replace(model, model_type=backbone, meta_class_size=size))
                 for size in columns.values())
        lines.append(f"| {backbone} | " + " | ".join(f"{count:,}" for count in cells) + " |")
    return "\n".join(lines)


@reports_errors
def params_main(argv: list[str] | None = None) -> int:
    """``reir params``: the trainable parameter count of a configuration and the memory it needs to train,
    without building it in memory."""
    parser = ArgumentParser(prog="reir params", description="Count trainable parameters and estimate the memory "
                                                            "training needs (no download, nothing allocated).")
    add_flags(parser, (*MODEL_FLAGS, "image_size", "batch_size", "recipe", "weights", "branch_batching"))
    parser.add_argument("--devices", type=positive_int, default=1,
                        help="devices the branches are split over (default 1)")
    parser.add_argument("--table", action="store_true",
                        help="print the original's whole parameter table (every backbone x benchmark at its meta "
                             "class size, the other model flags as given) instead of one configuration")
    args = vars(parser.parse_args(argv))
    devices = args.pop("devices")
    if args.pop("table"):
        print(parameter_table(TrainConfig(**args).model))
        return 0
    config = TrainConfig(**args)
    needs = estimate(config.model, config.image_size, config.batch_size, config.recipe, config.weights,
                     resolve_batching(config.branch_batching, torch.device("cpu")), devices)
    print(f"{needs.parameters:,}")
    print(f"{needs.describe()}; host-memory target of a run "
          f"{gib(needs.host_budget)} (1.25 x parameters, gradients and optimizer state + {gib(HOST_OVERHEAD)})")
    return 0
