"""``ncfast demo``: the four losses of Zhou et al. (NeurIPS 2022) trained into neural collapse on
digits, on a fixed budget; the table and the papers' figure."""

from __future__ import annotations

import os

import torch

from ..training import load_dataset, write_logs
from ..training.config import check_output_folder
from ..training.demo import DEMO_EPOCHS, demo_summary, demo_table, run_demo, write_demo_figure
from .common import CLIError, figures_note, user_errors

CLI_HELP = ("train CE / focal / label smoothing / rescaled MSE on digits into neural collapse (a fixed budget); "
            "print the table, plot training error and NC1-NC3")


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
    with user_errors():
        check_output_folder("out", args.out)
    torch.set_num_threads(args.threads)
    dataset = load_dataset("digits")
    runs = run_demo(args.epochs, quiet=args.quiet, dataset=dataset)
    for demo_run in runs:  # the runs' curves are in the one figure below
        write_logs(demo_run.result, args.out, f"demo_{demo_run.loss}", figure=False)
    print(demo_summary(runs, dataset))
    print(demo_table(runs))
    figure = write_demo_figure(runs, os.path.join(args.out, "nc_vs_epoch.png"))
    if figure is None:
        print(f"wrote demo_<loss>.csv/.json in {args.out}")
        print(figures_note())
    else:
        print(f"wrote {figure} (and demo_<loss>.csv/.json)")
    return 0
