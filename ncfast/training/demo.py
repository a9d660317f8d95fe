"""The demo: the loss comparison of Zhou et al. (NeurIPS 2022, "Are All Losses Created Equal:
A Neural Collapse Perspective", §4) at laptop scale, on a fixed budget.

The same MLP is trained on the embedded digits data with each of cross-entropy, focal loss
(γ = 3), label smoothing (α = 0.1) and rescaled MSE (κ = 1, β = 15) — that paper's set — into
the terminal phase of training (Papyan, Han, Donoho, PNAS 2020), with the learning-rate schedule
run to its end: nothing stops on a metric. NC1–NC4 of the training set are tracked every epoch;
:func:`demo_table` and :func:`write_demo_figure` turn the runs into the table and the papers'
figure (training error, NC1, NC2, NC3 against epoch, one line per loss, log scale).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..figures import curve_figure, figures_available
from ..loss_choices import LOSS_CHOICES, PAPER_LOSSES
from .config import TrainConfig
from .data import Dataset, load_dataset
from .logs import history_panels
from .loop import TrainResult, train

DEMO_EPOCHS = 150


def demo_config(loss: str = "ce", epochs: int = DEMO_EPOCHS, **overrides) -> TrainConfig:
    """The demo's recipe, shared by the four losses: SGD with momentum 0.9 and gradient-norm
    clipping at 2 as in Zhou et al. (NeurIPS 2022, §4), a cosine learning-rate decay to zero
    over the whole budget, and a weight decay of 2e-2 instead of the papers' 5e-4. The papers
    run 200 epochs of hundreds of steps; here 150 epochs are 450 steps, and weight decay is what
    drives the collapse: with 5e-4 and their step decay NC1 ends near 0.1 for CE and focal
    loss, with 2e-2 below 2e-3 for all four losses."""
    base = dict(dataset="digits", model="mlp", width=0.5, depth=3, feature_dim=64, optimizer="sgd", lr=0.05,
                momentum=0.9, weight_decay=2e-2, schedule="cosine", epochs=epochs, batch_size=512,
                clip_grad_norm=2.0, seed=0, loss=loss)
    base.update(overrides)
    return TrainConfig(**base)


@dataclass
class DemoRun:
    """One loss's run: its table label, the trainer's result and the wall-clock seconds."""

    loss: str
    label: str
    result: TrainResult
    seconds: float


def run_demo(epochs: int = DEMO_EPOCHS, quiet: bool = True, dataset: Optional[Dataset] = None,
             **overrides) -> list:
    """Trains the four losses of :data:`ncfast.loss_choices.PAPER_LOSSES` for ``epochs`` epochs
    each (the whole budget, every time); ``overrides`` change the shared recipe
    (:func:`demo_config`). Returns a list of :class:`DemoRun` in that order."""
    dataset = load_dataset("digits") if dataset is None else dataset
    runs = []
    for loss in PAPER_LOSSES:
        config = demo_config(loss, epochs, quiet=quiet, **overrides)
        start = time.perf_counter()
        result = train(config, dataset)
        runs.append(DemoRun(loss, LOSS_CHOICES[loss].label, result, time.perf_counter() - start))
    return runs


def demo_table(runs: list) -> str:
    """The final epoch of each run: training / test accuracy, NC1–NC4 and seconds."""
    header = (f"{'loss':<13} {'epochs':>6} {'train acc':>9} {'test acc':>8} {'NC1':>9} {'NC2':>9} {'NC3':>9} "
              f"{'NC4':>9} {'seconds':>7}")
    lines = [header, "-" * len(header)]
    for run in runs:
        f = run.result.final
        lines.append(f"{run.label:<13} {f['epoch']:>6} {100 * f['train_accuracy']:>8.2f}% "
                     f"{100 * f['test_accuracy']:>7.2f}% {f['nc1']:>9.2e} {f['nc2']:>9.2e} {f['nc3']:>9.2e} "
                     f"{f['nc4']:>9.2e} {run.seconds:>7.1f}")
    return "\n".join(lines)


def write_demo_figure(runs: list, path: str) -> Optional[str]:
    """Writes the papers' figure to ``path``: one panel each for training error, NC1, NC2 and NC3
    against epoch, one line per loss, log scale (a zero training error leaves the axis).
    Returns ``path``, or ``None`` when matplotlib is not installed."""
    if not figures_available():
        return None
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    panels = history_panels({run.label: run.result.history for run in runs})
    figure = curve_figure(panels, "epoch", title="MLP on digits: four losses into neural collapse")
    last = max(run.result.final["epoch"] for run in runs)
    for ax in figure.axes:  # every panel spans the budget, also where the training error is 0
        ax.set_xlim(0, last)
    figure.savefig(path, dpi=110)
    return path


def demo_summary(runs: list, dataset: Dataset) -> str:
    """One line naming the model, the data, the recipe and the threads of the table."""
    config = runs[0].result.config
    linears = [m for m in runs[0].result.model.body if isinstance(m, torch.nn.Linear)]
    sizes = [linears[0].in_features] + [m.out_features for m in linears]
    return (f"ncfast demo: MLP ({'-'.join(map(str, sizes))}, BatchNorm) on digits ({len(dataset.y_train)} train / "
            f"{len(dataset.y_test)} test), "
            f"SGD lr {config.lr} wd {config.weight_decay} {config.schedule} schedule, {config.epochs} epochs per "
            f"loss (the whole schedule), {torch.get_num_threads()} thread(s)")
