"""Figures of training curves, drawn with matplotlib (the optional ``plot`` extra).

One panel per metric, one line per run, against epoch or iteration, on a log axis by default —
the layout of the neural-collapse papers' figures (Papyan, Han, Donoho, PNAS 2020; Zhou et al.,
NeurIPS 2022, "Are All Losses Created Equal"). matplotlib is imported only when a figure is
drawn; :func:`figures_available` says whether it can be.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence, Tuple

import numpy as np

INSTALL_HINT = 'pip install "ncfast[plot]"'

# panel title -> {line label -> (xs, ys)}
Series = Mapping[str, Tuple[Sequence[float], Sequence[float]]]
Panels = Mapping[str, Series]


def figures_available() -> bool:
    """Whether matplotlib can be imported (``pip install "ncfast[plot]"`` installs it)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def curve_figure(panels: Panels, xlabel: str, title: str = "", log_y: bool = True, columns: int = 4):
    """A ``matplotlib.figure.Figure`` with one panel per entry of ``panels``.

    Args:
        panels: panel title -> {line label -> (xs, ys)}, the xs and ys of equal length. Points
            that are not finite, or ≤ 0 on a log axis, are left out (the line breaks there).
        xlabel: the x-axis label of every panel ("epoch", "iteration").
        title: the figure's title.
        log_y: log-scale y axes (a panel without a positive value stays linear).
        columns: panels per row (at most).
    Raises:
        ImportError naming the ``plot`` extra when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(f"figures need matplotlib: {INSTALL_HINT}") from None
    if not panels:
        raise ValueError("panels: expected at least one panel")
    columns = max(1, min(columns, len(panels)))
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3.4 * columns, 2.9 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax, (name, series) in zip(axes, panels.items()):
        positive = False
        for label, (xs, ys) in series.items():
            xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
            if xs.shape != ys.shape:
                raise ValueError(f"panels[{name!r}][{label!r}]: {xs.size} x values for {ys.size} y values")
            keep = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if log_y else True)
            positive |= bool(keep.any())
            ax.plot(xs, np.where(keep, ys, np.nan), label=label, linewidth=1.4)
        if log_y and positive:
            ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="major", alpha=0.3)
        if len(series) > 1:
            ax.legend(fontsize="small")
    for ax in axes[len(panels):]:
        figure.delaxes(ax)
    if title:
        figure.suptitle(title)
    return figure


def write_curves(path, panels: Panels, xlabel: str, title: str = "", log_y: bool = True, columns: int = 4,
                 dpi: int = 110) -> str:
    """:func:`curve_figure` saved to ``path`` (the format from its suffix: .png, .pdf, .svg)."""
    curve_figure(panels, xlabel, title, log_y, columns).savefig(path, dpi=dpi)
    return str(path)
