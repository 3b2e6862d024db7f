"""TensorBoard event files of a training run: each epoch's losses, metrics and learning rate."""

from __future__ import annotations

from pathlib import Path

from reir.errors import UsageError


def scalar_name(column: str) -> str:
    """``train_loss`` -> ``train/loss``, ``test_recall@1`` -> ``test/recall@1``: one chart group per split."""
    split, _, rest = column.partition("_")
    return f"{split}/{rest}" if split in ("train", "test") and rest else column


class TensorBoardWriter:
    """A training callback: on every finished epoch, every number of its statistics row."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise UsageError("`tensorboard` needs the tensorboard package; pip install tensorboard "
                             "or train without `tensorboard`") from None
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(log_dir))

    def __call__(self, event) -> None:
        if event.kind != "epoch":
            return
        for column, value in event.row.items():
            if column != "epoch" and value is not None:
                self.writer.add_scalar(scalar_name(column), value, event.epoch)
        self.writer.flush()  # a killed run keeps every finished epoch

    def close(self) -> None:
        self.writer.close()
