"""``reir train`` / ``train.py`` and ``reir params``: the command line of :mod:`reir.training.train`."""

from __future__ import annotations

import argparse
import copy

from reir.cli.common import ArgumentParser, reports_errors
from reir.model.network import count_parameters
from reir.training.config import MODEL_FLAGS, TrainConfig, add_flags
from reir.training.train import train


def get_args_parser(add_help: bool = True) -> ArgumentParser:
    parser = ArgumentParser(prog="train.py", add_help=add_help,
                            description="Train a REIR model (Randomized Ensembles for Image Retrieval).")
    parser.add_argument("--config", default=None, metavar="statistics/<name>_config.json",
                        help="repeat a recorded run: its settings (seed included); flags given beside it override "
                             "them and are recorded in the new run's configuration")
    return add_flags(parser)


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The settings typed on the command line, told apart from defaults by parsing again without any."""
    bare = copy.deepcopy(parser)
    for action in bare._actions:
        action.default = argparse.SUPPRESS
    return set(vars(bare.parse_args(argv)))


@reports_errors
def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    train(TrainConfig.from_args(args, given_flags(parser, argv)))
    return 0


@reports_errors
def params_main(argv: list[str] | None = None) -> int:
    """``reir params``: the trainable parameter count of a configuration, without building it in memory."""
    parser = ArgumentParser(prog="reir params", description="Count trainable parameters (no download).")
    config = TrainConfig(**vars(add_flags(parser, MODEL_FLAGS).parse_args(argv)))
    print(f"{count_parameters(config.model):,}")
    return 0
