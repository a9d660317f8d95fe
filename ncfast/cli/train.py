"""``ncfast train``: train a network while tracking neural collapse
(``torchrun --nproc_per_node P -m ncfast train ...`` trains data-parallel).

Every flag is checked before any data is read or any epoch runs: a bad one is one line on
stderr and exit code 2."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist

from ..figures import figures_available
from ..training import DATASETS, MODELS, OPTIMIZERS, SCHEDULES, TrainConfig, check_config, load_dataset, train
from ..training.config import check_training_set
from ..training.data import GAUSSIAN_LABELS
from ..training.loop import rank_and_world
from .common import CLIError, add_loss_arguments, figures_note, user_errors

CLI_HELP = "train a network while tracking neural collapse (NC1-NC4 per epoch); DDP under torchrun"


def add_arguments(parser) -> None:
    defaults = TrainConfig()
    add = parser.add_argument
    add("--dataset", choices=DATASETS, default=defaults.dataset)
    add("--data-dir", help="folder with the MNIST/CIFAR standard files (nothing is downloaded)")
    add("--random-labels", action="store_true", help="train on uniformly random labels (memorisation)")
    add("--train-size", type=int, help="use only the first N training samples")
    add("--gaussian-dim", type=int, default=defaults.gaussian_dim)
    add("--gaussian-classes", type=int, default=defaults.gaussian_classes)
    add("--gaussian-per-class", type=int, default=defaults.gaussian_per_class)
    add("--gaussian-labels", choices=GAUSSIAN_LABELS, default=defaults.gaussian_labels)
    add("--model", choices=MODELS, default=defaults.model)
    add("--width", type=float, default=defaults.width, help="width multiplier")
    add("--depth", type=int, default=defaults.depth, help="MLP hidden layers")
    add("--no-batch-norm", action="store_true", help="MLP without BatchNorm")
    add("--feature-dim", type=int, help="penultimate feature dimension d")
    add("--fixed-etf", action="store_true", help="fix the classifier to a simplex ETF")
    add("--no-bias", action="store_true", help="classifier without bias")
    add_loss_arguments(parser, defaults.loss)
    add("--optimizer", choices=OPTIMIZERS, default=defaults.optimizer)
    add("--lr", type=float, default=defaults.lr)
    add("--momentum", type=float, default=defaults.momentum)
    add("--weight-decay", type=float, default=defaults.weight_decay)
    add("--schedule", choices=SCHEDULES, default=defaults.schedule)
    add("--step-size", type=int, default=defaults.step_size, help="epochs between ÷10 for --schedule step")
    add("--epochs", type=int, default=defaults.epochs)
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch size")
    add("--clip-grad-norm", type=float, help="clip the gradient norm (Zhou et al. 2022 clip at 2)")
    add("--seed", type=int, default=defaults.seed)
    add("--second-pass", action="store_true", help="also NCC mismatch, cosine margins (a second pass)")
    add("--threads", type=int, help="torch threads per process")
    add("--device", help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK if available, else cpu)")
    add("--out", default="ncfast_out", help="folder for train_<loss>.csv/.json (and .png with matplotlib)")
    add("--quiet", action="store_true", help="no progress bar")


def run(args) -> int:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values = {key: value for key, value in vars(args).items() if key in names}
    values.update(batch_norm=not args.no_batch_norm, bias=not args.no_bias)
    config = TrainConfig(**values)
    with user_errors():
        check_config(config)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        _train_and_report(config)
    finally:
        if distributed:
            dist.destroy_process_group()
    return 0


def _train_and_report(config: TrainConfig) -> None:
    rank, world = rank_and_world()
    if config.batch_size % world:
        raise CLIError(f"batch_size: {config.batch_size} is not divisible by the {world} processes")
    with user_errors():  # the data files are checked as they are read, before the first epoch
        dataset = load_dataset(config.dataset, config.data_dir, config.seed, config.random_labels, config.train_size,
                               config.gaussian_dim, config.gaussian_classes, config.gaussian_per_class,
                               config.gaussian_labels)
        check_training_set(config, dataset.y_train, dataset.num_classes, world)
    result = train(config, dataset)
    if rank == 0:
        final = result.final
        print(f"{config.loss} on {config.dataset} ({config.model}, {world} process{'es' if world > 1 else ''}, "
              f"{result.trainable_parameters} trainable parameters): epochs {final['epoch']}, "
              f"train acc {100 * final['train_accuracy']:.2f}%, test acc {100 * final['test_accuracy']:.2f}%, "
              f"NC1 {final['nc1']:.3e} NC2 {final['nc2']:.3e} NC3 {final['nc3']:.3e} NC4 {final['nc4']:.3e}, "
              f"{result.seconds:.1f}s")
        suffixes = ".csv/.json/.png" if figures_available() else ".csv/.json"
        print(f"wrote {os.path.join(config.out, 'train_' + config.loss)}{suffixes}")
        note = figures_note()
        if note:
            print(note)
