"""The trainer's logs: per-epoch CSV, a JSON record of the run and a figure of the curves."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import TYPE_CHECKING

from ..plot import write_line_plot

if TYPE_CHECKING:
    from .loop import TrainResult


def write_logs(result: TrainResult, out: str, stem: str) -> list:
    """``stem``.csv (one row per epoch), ``stem``.json (config, parameter count, history) and
    ``stem``.png (NC1–NC4 and train/test error against epoch, log scale) under ``out``."""
    os.makedirs(out, exist_ok=True)
    history = result.history
    keys = list(history[0]) if history else []
    paths = [os.path.join(out, f"{stem}.{ext}") for ext in ("csv", "json", "png")]
    with open(paths[0], "w") as handle:
        handle.write(",".join(keys) + "\n")
        for row in history:
            handle.write(",".join(f"{row.get(k, float('nan')):.10g}" for k in keys) + "\n")
    with open(paths[1], "w") as handle:
        json.dump({"config": dataclasses.asdict(result.config), "trainable_parameters": result.trainable_parameters,
                   "seconds": result.seconds, "history": history}, handle, indent=1)
    epochs = [row["epoch"] for row in history]
    series = {key: (epochs, [row.get(key) for row in history]) for key in ("nc1", "nc2", "nc3", "nc4")}
    series["train error"] = (epochs, [1 - row["train_accuracy"] for row in history])
    series["test error"] = (epochs, [1 - row["test_accuracy"] for row in history])
    write_line_plot(paths[2], series, title=f"{stem}: nc metrics and error vs epoch", xlabel="epoch")
    return paths
