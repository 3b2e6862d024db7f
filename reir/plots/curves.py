"""Plot a training run: loss, accuracy and Recall@K per epoch from its statistics CSV."""

from __future__ import annotations

import csv
from pathlib import Path

from reir.errors import ReirError
from reir.fileio import FORMAT_CHUNK, atomic_write_with, claim_output

# Recorded in the PNG, so a later plot knows the file is its own to replace (reir/fileio.py).
PLOT_FORMAT = "reir-plot/1"


def read_statistics(path: str | Path) -> dict[str, list[float]]:
    """Columns of the CSV train.py writes (``epoch``, ``train_loss``, ``train_accuracy``, ``test_recall@K``, ...).

    Empty cells (metrics computed only every few epochs) become NaN.
    """
    path = Path(path)
    if not path.is_file():
        raise ReirError(f"statistics file {path} does not exist; pass the *_results.csv under statistics/")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ReirError(f"{path} is not a statistics CSV ({exc}); pass the *_results.csv train.py wrote") from None
    if not rows or "epoch" not in rows[0]:
        raise ReirError(f"{path} has no epoch rows; pass the *_results.csv train.py wrote")
    columns: dict[str, list[float]] = {name: [] for name in rows[0]}
    for line, row in enumerate(rows, start=2):
        for name in columns:
            if row[name] == "":  # a metric not computed that epoch: a gap in its line
                columns[name].append(float("nan"))
                continue
            try:
                columns[name].append(float(row[name]))
            except (TypeError, ValueError):
                raise ReirError(f"{path} line {line}: {name} is {row[name]!r}, not a number; "
                                "pass the *_results.csv train.py wrote") from None
    return columns


def build_figure(columns: dict[str, list[float]], title: str):
    """Three panels against epoch: train loss, train accuracy (%), every Recall@K (%)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = columns["epoch"]
    recalls = sorted((name for name in columns if "recall@" in name), key=lambda n: int(n.rsplit("@", 1)[1]))
    panels = [("train loss", ["train_loss"], 1.0), ("train accuracy (%)", ["train_accuracy"], 100.0),
              ("Recall@K (%)", recalls, 100.0)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), constrained_layout=True)
    for axis, (name, series, scale) in zip(axes, panels):
        for column in series:
            if column in columns:
                axis.plot(epochs, [scale * v for v in columns[column]], marker="o",
                          label=column.replace("test_recall@", "R@"))
        axis.set_title(name)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        axis.xaxis.get_major_locator().set_params(integer=True)
        if axis.lines and len(series) > 1:  # below the panel, never over a curve
            axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(series), frameon=False)
    figure.suptitle(title)
    return figure


def plot_statistics(csv_path: str | Path, png_path: str | Path | None = None, overwrite: bool = False,
                    setting: str = "`overwrite`") -> Path:
    """Write the figure as a PNG beside the CSV (or at ``png_path``).

    An existing file there is replaced only when an earlier plot wrote it, or with ``overwrite``; never
    the CSV itself. ``setting`` is how the caller's user sets ``overwrite``, named in the refusal.
    """
    png_path = Path(png_path) if png_path is not None else Path(csv_path).with_suffix(".png")
    claim_output(png_path, (PLOT_FORMAT,), inputs=[csv_path], overwrite=overwrite, setting=setting)
    figure = build_figure(read_statistics(csv_path), Path(csv_path).stem)
    import matplotlib.pyplot as plt

    try:
        atomic_write_with(png_path, lambda tmp: figure.savefig(tmp, format="png", dpi=100,
                                                               metadata={FORMAT_CHUNK: PLOT_FORMAT}))
    finally:
        plt.close(figure)
    return png_path
