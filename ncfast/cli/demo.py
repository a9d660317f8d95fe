"""``ncfast demo``: seed 002's loss comparison in about a minute on a laptop CPU.

Trains the same small MLP on the embedded digits data with each of cross-entropy, focal loss
(γ = 3), label smoothing (α = 0.1) and rescaled MSE (κ = 1, β = 15) — seed 002 §4's set — into
the terminal phase (100% training accuracy), tracking NC1–NC4 of the training set each epoch,
then prints one table and writes ``nc1_vs_epoch.png`` (and each run's CSV/JSON logs).
"""

from __future__ import annotations

import os
import time

import torch

from ..plot import write_line_plot
from ..training import TrainConfig, load_dataset, train, write_logs
from .common import CLIError

CLI_HELP = "train CE / focal / label smoothing / rescaled MSE on digits to neural collapse; print a table, plot NC1"

# seed 002 §4's loss set with its parameters
DEMO_LOSSES = (("ce", {}), ("focal", {"gamma": 3.0}), ("ls", {"label_smoothing": 0.1}),
               ("mse", {"kappa": 1.0, "beta": 15.0}))
LABELS = {"ce": "CE", "focal": "focal g=3", "ls": "LS a=0.1", "mse": "MSE k=1 b=15"}


def demo_config(**overrides) -> TrainConfig:
    """The demo's training recipe (shared by the four losses): SGD with momentum, cosine decay,
    strong weight decay (it drives the collapse), gradient clipping at 2 (seed 002), stopping
    once the training set is fitted and NC1 ≤ ``stop_at``."""
    base = dict(dataset="digits", model="mlp", width=1.0, depth=3, feature_dim=64, optimizer="sgd", lr=0.2,
                momentum=0.9, weight_decay=5e-3, schedule="cosine", epochs=400, batch_size=512,
                clip_grad_norm=2.0, stop_at=5e-3, seed=0)
    base.update(overrides)
    return TrainConfig(**base)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="ncfast_out", help="output folder (default ncfast_out/)")
    parser.add_argument("--epochs", type=int, default=None, help="epoch cap per loss (default 400)")
    # one thread: the matrices are small (batch 512 × 256), so threads cost more in synchronisation
    # than they save, and the table does not depend on the machine's thread count
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    for name in ("epochs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise CLIError(f"--{name}: expected a positive integer, got {value}")
    torch.set_num_threads(args.threads)
    dataset = load_dataset("digits")
    rows, curves = [], {}
    for loss, params in DEMO_LOSSES:
        overrides = dict(loss=loss, quiet=args.quiet, **params)
        if args.epochs:
            overrides["epochs"] = args.epochs
        config = demo_config(**overrides)
        start = time.perf_counter()
        result = train(config, dataset)
        seconds = time.perf_counter() - start
        write_logs(result, args.out, f"demo_{loss}")
        final = result.final
        rows.append((LABELS[loss], final["epoch"], final["train_accuracy"], final["test_accuracy"], final["nc1"],
                     final["nc2"], final["nc3"], final["nc4"], seconds))
        curves[LABELS[loss]] = ([r["epoch"] for r in result.history], [r["nc1"] for r in result.history])
    header = f"{'loss':<13} {'epochs':>6} {'train acc':>9} {'test acc':>8} {'NC1':>9} {'NC2':>9} {'NC3':>9} " \
             f"{'NC4':>9} {'seconds':>7}"
    print(f"ncfast demo: MLP (64-256-256-256-64, BatchNorm) on digits ({len(dataset.y_train)} train / "
          f"{len(dataset.y_test)} test), SGD, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for label, epochs, train_acc, test_acc, nc1, nc2, nc3, nc4, seconds in rows:
        print(f"{label:<13} {epochs:>6} {100 * train_acc:>8.2f}% {100 * test_acc:>7.2f}% {nc1:>9.2e} {nc2:>9.2e} "
              f"{nc3:>9.2e} {nc4:>9.2e} {seconds:>7.1f}")
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "nc1_vs_epoch.png")
    write_line_plot(png, curves, title="nc1 vs epoch: digits mlp", xlabel="epoch")
    print(f"wrote {png} (and demo_<loss>.csv/.json/.png)")
    return 0

