"""``reir train`` / ``train.py`` and ``reir params``: the command line of :mod:`reir.training.train`."""

from __future__ import annotations

from reir.cli.common import ArgumentParser, reports_errors
from reir.model.network import count_parameters
from reir.training.config import MODEL_FLAGS, TrainConfig, add_flags
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
    """``reir params``: the trainable parameter count of a configuration, without building it in memory."""
    parser = ArgumentParser(prog="reir params", description="Count trainable parameters (no download).")
    config = TrainConfig(**vars(add_flags(parser, MODEL_FLAGS).parse_args(argv)))
    print(f"{count_parameters(config.model):,}")
    return 0
