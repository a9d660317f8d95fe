"""The trainer's logs: per-epoch CSV, a JSON record of the run and a figure of its curves."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from ..figures import figures_available, write_curves

if TYPE_CHECKING:
    from .loop import TrainResult

# panel title -> the value an epoch's history row gives it
HISTORY_PANELS: dict[str, Callable[[dict], float]] = {
    "training error": lambda row: 1.0 - row["train_accuracy"],
    "test error": lambda row: 1.0 - row["test_accuracy"],
    "NC1": lambda row: row.get("nc1"),
    "NC2": lambda row: row.get("nc2"),
    "NC3": lambda row: row.get("nc3"),
    "NC4": lambda row: row.get("nc4"),
}
# the papers' figure: training error and NC1-NC3 against epoch (Papyan, Han, Donoho, PNAS 2020;
# Zhou et al., NeurIPS 2022, "Are All Losses Created Equal")
PAPER_PANELS = ("training error", "NC1", "NC2", "NC3")


def history_panels(runs: Mapping[str, Sequence[dict]], panels: Sequence[str] = PAPER_PANELS) -> dict:
    """Curves of :func:`ncfast.figures.write_curves` from training histories.

    Args:
        runs: line label -> a run's history (:attr:`TrainResult.history`, one dict per epoch).
        panels: titles from :data:`HISTORY_PANELS`, one panel each, one line per run.
    """
    unknown = [name for name in panels if name not in HISTORY_PANELS]
    if unknown:
        raise ValueError(f"panels: expected names from {tuple(HISTORY_PANELS)}, got {unknown}")
    return {name: {label: ([row["epoch"] for row in history], [HISTORY_PANELS[name](row) for row in history])
                   for label, history in runs.items()}
            for name in panels}


def write_logs(result: TrainResult, out: str, stem: str, figure: bool = True) -> list:
    """Write under ``out``: ``stem``.csv (one row per epoch), ``stem``.json (config, parameter
    count, history) and, with ``figure`` and matplotlib installed, ``stem``.png (training and
    test error, NC1–NC4 against epoch, log scale). Returns the paths written."""
    os.makedirs(out, exist_ok=True)
    history = result.history
    keys = list(history[0]) if history else []
    paths = [os.path.join(out, f"{stem}.{ext}") for ext in ("csv", "json")]
    with open(paths[0], "w") as handle:
        handle.write(",".join(keys) + "\n")
        for row in history:
            handle.write(",".join(f"{row.get(k, float('nan')):.10g}" for k in keys) + "\n")
    with open(paths[1], "w") as handle:
        json.dump({"config": dataclasses.asdict(result.config), "trainable_parameters": result.trainable_parameters,
                   "seconds": result.seconds, "history": history}, handle, indent=1)
    if figure and history and figures_available():
        panels = history_panels({stem: history}, tuple(HISTORY_PANELS))
        paths.append(write_curves(os.path.join(out, f"{stem}.png"), panels, "epoch", title=stem, columns=3))
    return paths
