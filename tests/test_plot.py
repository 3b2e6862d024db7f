"""reir plot: the figure holds the CSV's numbers; bad CSVs are refused in one line."""

import math

import pytest
from PIL import Image

from conftest import run_reir
from reir.cli.plot import main
from reir.errors import ReirError
from reir.plots.curves import build_figure, read_statistics

CSV = ("epoch,train_loss,train_accuracy,test_recall@1,test_recall@10,test_recall@2,test_nmi\n"
       "1,0.9,0.5,0.25,0.5,0.375,\n"
       "2,0.4,0.75,0.5,0.875,0.625,0.3\n")


def test_figure_plots_every_column_per_epoch(tmp_path):
    path = tmp_path / "run_results.csv"
    path.write_text(CSV)
    figure = build_figure(read_statistics(path), "run")
    loss, accuracy, recall = figure.axes
    assert list(loss.lines[0].get_xdata()) == [1, 2] and list(loss.lines[0].get_ydata()) == [0.9, 0.4]
    assert list(accuracy.lines[0].get_ydata()) == [50.0, 75.0]
    assert [line.get_label() for line in recall.lines] == ["R@1", "R@2", "R@10"]  # numeric order
    assert list(recall.lines[2].get_ydata()) == [50.0, 87.5]
    nmi = read_statistics(path)["test_nmi"]  # computed only in epoch 2: a gap, not an error
    assert math.isnan(nmi[0]) and nmi[1] == 0.3


def test_the_recall_legend_covers_no_data(tmp_path):
    """The legend sat inside the Recall@K panel, over the R@1 curve."""
    path = tmp_path / "run_results.csv"
    path.write_text(CSV)
    figure = build_figure(read_statistics(path), "run")
    figure.canvas.draw()
    recall = figure.axes[2]
    legend = recall.get_legend().get_window_extent()
    assert not legend.overlaps(recall.get_window_extent())  # outside the plotting area, so over no curve
    assert legend.y1 > 0 and legend.x0 >= 0 and legend.x1 <= figure.bbox.x1  # and still in the picture


def test_reir_plot_writes_a_png_and_refuses_bad_input(tmp_path, capsys):
    good = tmp_path / "run_results.csv"
    good.write_text(CSV)
    result = run_reir("plot", str(good))
    assert result.returncode == 0, result.stderr
    image = Image.open(tmp_path / "run_results.png")
    assert image.format == "PNG" and image.size == (1500, 400)

    bad_value = tmp_path / "bad.csv"
    bad_value.write_text("epoch,train_loss\n1,0.5\n2,oops\n")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for path, message in ((tmp_path / "missing.csv", "does not exist"), (bad_value, "line 3: train_loss"),
                          (empty, "no epoch rows")):
        with pytest.raises(ReirError) as raised:
            read_statistics(path)
        assert message in str(raised.value)
    assert main([str(bad_value), "--output", str(tmp_path / "bad.png")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "oops" in err
    assert not (tmp_path / "bad.png").exists()


def test_reir_plot_replaces_only_its_own_png_and_never_its_csv(tmp_path, capsys):
    """It wrote over any file at --output, its own statistics CSV included."""
    statistics = tmp_path / "run_results.csv"
    statistics.write_text(CSV)
    notes = tmp_path / "notes.png"
    notes.write_bytes(b"the user's file")
    for output in (notes, statistics):
        assert main([str(statistics), "--output", str(output)]) == 2
        assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert notes.read_bytes() == b"the user's file" and statistics.read_text() == CSV
    assert main([str(statistics), "--output", str(statistics), "--overwrite"]) == 2  # its input, whatever is said
    assert statistics.read_text() == CSV

    plot = tmp_path / "plot.png"
    assert main([str(statistics), "--output", str(plot)]) == 0
    first = plot.read_bytes()
    statistics.write_text(CSV + "3,0.2,0.875,0.75,1.0,0.875,0.4\n")
    assert main([str(statistics), "--output", str(plot)]) == 0  # an earlier plot: replaced without asking
    assert plot.read_bytes() != first
    assert main([str(statistics), "--output", str(notes), "--overwrite"]) == 0
    assert Image.open(notes).format == "PNG"
