"""``reir train`` / ``train.py`` and ``reir params``: the command line of :mod:`reir.training.train`."""

from __future__ import annotations

import torch

from reir.argtypes import positive_int
from reir.cli.common import ArgumentParser, reports_errors
from reir.model.branches import resolve_batching
from reir.training.config import MODEL_FLAGS, TrainConfig, add_flags
from reir.training.memory import HOST_OVERHEAD, estimate, gib
from reir.training.train import train


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", add_help=add_help,
                            description="Train a REIR model (Randomized Ensembles for Image Retrieval).")
    return add_flags(parser)


@reports_errors
def main(argv: list[str] | None = None) -> int:
    train(TrainConfig.from_args(get_args_parser().parse_args(argv)))
    return 0


@reports_errors
def params_main(argv: list[str] | None = None) -> int:
    """``reir params``: the trainable parameter count of a configuration and the memory it needs to train,
    without building it in memory."""
    parser = ArgumentParser(prog="reir params", description="Count trainable parameters and estimate the memory "
                                                            "training needs (no download, nothing allocated).")
    add_flags(parser, (*MODEL_FLAGS, "image_size", "batch_size", "recipe", "weights", "branch_batching"))
    parser.add_argument("--devices", type=positive_int, default=1,
                        help="devices the branches are split over (default 1)")
    args = vars(parser.parse_args(argv))
    devices = args.pop("devices")
    config = TrainConfig(**args)
    needs = estimate(config.model, config.image_size, config.batch_size, config.recipe, config.weights,
                     resolve_batching(config.branch_batching, torch.device("cpu")), devices)
    print(f"{needs.parameters:,}")
    print(f"{needs.describe()}; host-memory target of a run "
          f"{gib(needs.host_budget)} (1.25 x parameters, gradients and optimizer state + {gib(HOST_OVERHEAD)})")
    return 0
