"""``ncfast demo``: four losses trained to neural collapse on digits; a table and the figure."""

from __future__ import annotations

import os

import torch

from ..training import load_dataset, write_logs
from ..training.demo import DEMO_EPOCHS, demo_summary, demo_table, run_demo, write_demo_figure
from .common import CLIError

CLI_HELP = ("train CE / focal / label smoothing / rescaled MSE on digits into neural collapse (a fixed budget); "
            "print the table, write the figure")


def add_arguments(parser) -> None:
    parser.add_argument("--out", default="ncfast_out", help="output folder (default ncfast_out/)")
    parser.add_argument("--epochs", type=int, default=DEMO_EPOCHS,
                        help=f"epochs per loss, the whole learning-rate schedule (default {DEMO_EPOCHS})")
    # one thread: the matrices are small (batch 512 × 128), so threads cost more in synchronisation
    # than they save, and the table does not depend on the machine's thread count
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args) -> int:
    for name in ("epochs", "threads"):
        value = getattr(args, name)
        if value < 1:
            raise CLIError(f"--{name}: expected a positive integer, got {value}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise CLIError(f"--out: {args.out!r} exists and is not a folder")
    torch.set_num_threads(args.threads)
    dataset = load_dataset("digits")
    runs = run_demo(args.epochs, quiet=args.quiet, dataset=dataset)
    for demo_run in runs:
        write_logs(demo_run.result, args.out, f"demo_{demo_run.loss}")
    print(demo_summary(runs, dataset))
    print(demo_table(runs))
    figure = write_demo_figure(runs, os.path.join(args.out, "demo.png"))
    if figure is None:
        print(f"wrote {args.out}/demo_<loss>.csv/.json; for the figure install matplotlib "
              f"(pip install \"ncfast[plot]\") and run again")
    else:
        print(f"wrote {figure} (and {args.out}/demo_<loss>.csv/.json)")
    return 0
