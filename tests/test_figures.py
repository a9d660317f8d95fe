"""Figures with matplotlib: one panel per metric, one line per run, log axes, the curves' points
exactly, bad points left out; a PNG of the asked size."""

import math
import struct

import numpy as np
import pytest

from ncfast import figures
from ncfast.training import PAPER_PANELS, history_panels


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_panels_lines_and_points():
    x = np.arange(50)
    panels = {"NC1": {"ce": (x, np.exp(-x / 5.0)), "mse": (x, 1.0 / (1 + x))},
              "bad": {"run": ([0, 1, 2], [math.nan, -1.0, 0.5])}}
    figure = figures.curve_figure(panels, "epoch", title="digits")
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == ["NC1", "bad"] and figure.get_suptitle() == "digits"
    assert all(ax.get_yscale() == "log" and ax.get_xlabel() == "epoch" for ax in axes)
    lines = axes[0].get_lines()
    assert [line.get_label() for line in lines] == ["ce", "mse"]
    np.testing.assert_array_equal(lines[0].get_xdata(), x)
    np.testing.assert_allclose(lines[1].get_ydata(), 1.0 / (1 + x))
    assert len({line.get_color() for line in lines}) == 2  # every curve its own colour
    # NaN and a negative value on a log axis are left out: the line breaks there
    kept = np.asarray(axes[1].get_lines()[0].get_ydata(), dtype=float)
    assert np.isnan(kept[:2]).all() and kept[2] == 0.5
    assert axes[0].get_legend() is not None and axes[1].get_legend() is None  # a legend when lines compete


def test_linear_axis_and_a_panel_without_positive_values():
    figure = figures.curve_figure({"acc": {"a": ([0, 1, 2], [0.1, 0.5, 0.9])}, "zero": {"a": ([0, 1], [0.0, 0.0])}},
                                  "iteration", log_y=True)
    assert [ax.get_yscale() for ax in figure.get_axes()] == ["log", "linear"]
    linear = figures.curve_figure({"acc": {"a": ([0, 1, 2], [0.1, 0.5, 0.9])}}, "iteration", log_y=False)
    assert linear.get_axes()[0].get_yscale() == "linear"


def test_write_curves_png_size(tmp_path):
    panels = {f"p{i}": {"a": ([0, 1, 2], [1.0, 0.5, 0.25])} for i in range(6)}
    path = figures.write_curves(tmp_path / "curves.png", panels, "epoch", columns=3, dpi=50)
    width, height = _png_size(tmp_path / "curves.png")
    assert path.endswith("curves.png") and (width, height) == (round(3 * 3.4 * 50), round(2 * 2.9 * 50))


def test_bad_panels():
    with pytest.raises(ValueError, match="panels"):
        figures.curve_figure({}, "epoch")
    with pytest.raises(ValueError, match="panels"):
        figures.curve_figure({"NC1": {"a": ([0, 1], [1.0])}}, "epoch")


def test_history_panels_are_the_papers_figure():
    history = [{"epoch": e, "train_accuracy": 0.5 + e / 10, "test_accuracy": 0.5, "nc1": 1.0 / e, "nc2": 0.1,
                "nc3": 0.2, "nc4": 0.3} for e in (1, 2, 3)]
    panels = history_panels({"CE": history, "MSE": history[:2]})
    assert tuple(panels) == PAPER_PANELS == ("training error", "NC1", "NC2", "NC3")
    assert panels["training error"]["CE"] == ([1, 2, 3], pytest.approx([0.4, 0.3, 0.2]))
    assert panels["NC1"]["MSE"] == ([1, 2], [1.0, 0.5])
    with pytest.raises(ValueError, match="panels"):
        history_panels({"CE": history}, ("NC9",))


def test_without_matplotlib(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert not figures.figures_available()
    with pytest.raises(ImportError, match=r'pip install "ncfast\[plot\]"'):
        figures.curve_figure({"NC1": {"a": ([0], [1.0])}}, "epoch")
