"""``ncfast demo``: the loss comparison of Zhou et al. (NeurIPS 2022, "Are All Losses Created
Equal: A Neural Collapse Perspective") in about a minute on a laptop CPU.

Trains the same small MLP on the embedded digits data with each of cross-entropy, focal loss
(γ = 3), label smoothing (α = 0.1) and rescaled MSE (κ = 1, β = 15) — that paper's set,
:data:`ncfast.loss_choices.PAPER_LOSSES` — into the terminal phase (100% training accuracy),
tracking NC1–NC4 of the training set each epoch, then prints one table and writes
``nc_vs_epoch.png`` (training error and NC1–NC3 against epoch, one line per loss; with
matplotlib) and each run's CSV/JSON logs.
"""

from __future__ import annotations

import os
import time

import torch

from ..figures import figures_available, write_curves
from ..loss_choices import LOSS_CHOICES, PAPER_LOSSES
from ..training import TrainConfig, history_panels, load_dataset, train, write_logs
from ..training.config import check_output_folder
from .common import CLIError, figures_note, user_errors

CLI_HELP = "train CE / focal / label smoothing / rescaled MSE on digits to neural collapse; print a table, plot NC"


def demo_config(**overrides) -> TrainConfig:
    """The demo's training recipe (shared by the four losses): SGD with momentum, cosine decay,
    strong weight decay (it drives the collapse), gradient clipping at 2 (as Zhou et al. 2022), stopping
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
    with user_errors():
        check_output_folder("out", args.out)
    torch.set_num_threads(args.threads)
    dataset = load_dataset("digits")
    rows, histories = [], {}
    for loss in PAPER_LOSSES:
        label = LOSS_CHOICES[loss].label
        overrides = dict(loss=loss, quiet=args.quiet)
        if args.epochs:
            overrides["epochs"] = args.epochs
        config = demo_config(**overrides)
        start = time.perf_counter()
        result = train(config, dataset)
        seconds = time.perf_counter() - start
        write_logs(result, args.out, f"demo_{loss}")
        final = result.final
        rows.append((label, final["epoch"], final["train_accuracy"], final["test_accuracy"], final["nc1"],
                     final["nc2"], final["nc3"], final["nc4"], seconds))
        histories[label] = result.history
    header = f"{'loss':<13} {'epochs':>6} {'train acc':>9} {'test acc':>8} {'NC1':>9} {'NC2':>9} {'NC3':>9} " \
             f"{'NC4':>9} {'seconds':>7}"
    print(f"ncfast demo: MLP (64-256-256-256-64, BatchNorm) on digits ({len(dataset.y_train)} train / "
          f"{len(dataset.y_test)} test), SGD, {torch.get_num_threads()} threads")
    print(header)
    print("-" * len(header))
    for label, epochs, train_acc, test_acc, nc1, nc2, nc3, nc4, seconds in rows:
        print(f"{label:<13} {epochs:>6} {100 * train_acc:>8.2f}% {100 * test_acc:>7.2f}% {nc1:>9.2e} {nc2:>9.2e} "
              f"{nc3:>9.2e} {nc4:>9.2e} {seconds:>7.1f}")
    if figures_available():
        png = write_curves(os.path.join(args.out, "nc_vs_epoch.png"), history_panels(histories), "epoch",
                           title="MLP on digits")
        print(f"wrote {png} (and demo_<loss>.csv/.json/.png)")
    else:
        print(f"wrote demo_<loss>.csv/.json in {args.out}")
        print(figures_note())
    return 0

