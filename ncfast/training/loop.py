"""The training loop: learning-rate schedules, optimisers, per-epoch evaluation with
neural-collapse metrics, data-parallel training under ``torchrun``.

After every epoch NC1–NC4 of the training set come from an :class:`ncfast.NCTracker` on the
classifier (it sees the penultimate features), with train and test accuracy. Under ``torchrun``
it trains data-parallel (DDP; gloo on CPU, NCCL on CUDA) and all-reduces the NC statistics, so
the metrics are those of the whole set.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..loss_choices import loss_function
from ..ncstats_metrics import UndefinedMetricError
from ..progress import progress_bar
from ..tracker import NCTracker
from .config import OPTIMIZERS, SCHEDULES, TrainConfig, check_config, check_training_set
from .data import Dataset, load_dataset
from .logs import write_logs
from .models import build_model, trainable_parameters


def lr_factor(schedule: str, epoch: int, epochs: int, step_size: int = 40) -> float:
    """Learning-rate multiplier at ``epoch`` (0-based): "step" ÷10 every ``step_size`` epochs
    (Zhu et al., NeurIPS 2021, §4), "multistep" ×0.1 at 3/7 and 5/7 of training (Zhou et al.,
    NeurIPS 2022, "Are All Losses Created Equal", §4), "cosine", "constant"."""
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 ** (epoch // step_size)
    if schedule == "multistep":
        return 0.1 ** sum(epoch >= m for m in (int(epochs * 3 / 7), int(epochs * 5 / 7)))
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")


@dataclass
class TrainResult:
    config: TrainConfig
    history: list = field(default_factory=list)  # one dict per epoch
    model: Optional[nn.Module] = None
    trainable_parameters: int = 0
    seconds: float = 0.0

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) without it."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# the float metrics of a classifier's NCMetrics (what a degenerate evaluation logs as NaN)
_NC_KEYS = ("nc1", "equinorm_means", "equiangularity_means", "max_angle_means", "cdnv", "nc2", "nc3", "nc4",
            "equinorm_classifier", "equiangularity_classifier", "max_angle_classifier")


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, num_classes: int, batch_size: int = 512,
             nc: bool = True, second_pass: bool = False) -> dict:
    """Accuracy and (``nc=True``) NC metrics of ``model`` on (x, y), in eval mode: an
    :class:`ncfast.NCTracker` on ``model.classifier`` sees the features that enter it.

    Under torch.distributed each rank takes the samples ``rank::world`` and the NC statistics
    and counts are all-reduced, so every rank gets the metrics of the whole set."""
    net = _unwrap(model)
    if net.classifier.weight.shape[0] != num_classes:
        raise ValueError(f"num_classes: is {num_classes}, the model's classifier has {net.classifier.weight.shape[0]}")
    was_training = net.training
    net.eval()
    rank, world = rank_and_world()
    device = net.classifier.weight.device
    x, y = x[rank::world], y[rank::world]
    tracker = NCTracker(net.classifier, enabled=nc)
    correct = torch.zeros(2, dtype=torch.float64, device=device)
    # the metrics that need the finished class means (second_pass) take the data again
    for again in ((False, True) if nc and second_pass else (False,)):
        with tracker.track(second_pass=again):
            for start in range(0, len(y), batch_size):
                xb = x[start: start + batch_size].to(device, non_blocking=True)
                yb = y[start: start + batch_size].to(device, non_blocking=True)
                tracker.observe(yb)
                logits = net(xb)
                if not again:
                    correct[0] += (logits.argmax(1) == yb).sum()
                    correct[1] += len(yb)
    if world > 1:
        dist.all_reduce(correct)
    result = {"accuracy": float(correct[0] / correct[1])}
    if nc:
        try:
            metrics = tracker.compute().as_dict()
        except UndefinedMetricError as error:
            # A degenerate epoch (e.g. a dead layer: every feature 0) has no NC geometry; the log
            # records NaN for it rather than ending the training run.
            warnings.warn(f"NC metrics undefined at this evaluation: {error}", RuntimeWarning, stacklevel=2)
            metrics = dict.fromkeys(_NC_KEYS + (("ncc_mismatch",) if second_pass else ()), math.nan)
        result.update({key: value for key, value in metrics.items()
                       if isinstance(value, float) and key not in ("num_samples",)})
    net.train(was_training)
    return result


def _optimizer(config: TrainConfig, model: nn.Module):
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "lbfgs":  # weight decay goes into the closure's loss (LBFGS has none)
        return torch.optim.LBFGS(params, lr=config.lr, history_size=20, max_iter=5, line_search_fn="strong_wolfe")
    raise ValueError(f"optimizer: expected one of {OPTIMIZERS}, got {config.optimizer!r}")


def train(config: TrainConfig, dataset: Optional[Dataset] = None, model: Optional[nn.Module] = None) -> TrainResult:
    """Train per ``config``; returns the per-epoch history (epoch, lr, loss, train/test accuracy,
    NC1–NC4 and the other :class:`ncfast.NCMetrics` values, seconds) and the model.

    Under torch.distributed (e.g. ``torchrun``) the model is wrapped in DDP and every global
    batch (same seeded order on every rank) is split ``rank::world``: with a batch size divisible
    by the world size the averaged gradient is the one-process gradient. Rank 0 alone writes
    ``out`` and prints."""
    check_config(config)
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    rank, world = rank_and_world()
    torch.manual_seed(config.seed)
    if dataset is None:
        dataset = load_dataset(config.dataset, config.data_dir, config.seed, config.random_labels, config.train_size,
                               config.gaussian_dim, config.gaussian_classes, config.gaussian_per_class,
                               config.gaussian_labels)
    check_training_set(config, dataset.y_train, dataset.num_classes, world)
    if model is None:
        model = build_model(config.model, dataset.input_shape, dataset.num_classes, config.feature_dim, config.width,
                            config.depth, config.fixed_etf, config.bias, config.batch_norm)
    device = torch.device(config.device or (f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
                                            if torch.cuda.is_available() else "cpu"))
    model = model.to(device)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    loss_fn = loss_function(config.loss, label_smoothing=config.label_smoothing, gamma=config.gamma,
                            kappa=config.kappa, beta=config.beta)
    optimizer = _optimizer(config, net)
    params = [p for p in net.parameters() if p.requires_grad]
    result = TrainResult(config, model=model, trainable_parameters=trainable_parameters(model))
    x, y = dataset.x_train, dataset.y_train
    order_gen = torch.Generator().manual_seed(config.seed)
    batches_per_epoch = math.ceil(len(y) / config.batch_size)
    bar = progress_bar(config.epochs * batches_per_epoch, config.loss, enabled=not config.quiet and rank == 0)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        lr = config.lr * lr_factor(config.schedule, epoch, config.epochs, config.step_size)
        for group in optimizer.param_groups:
            group["lr"] = lr
        net.train()
        order = torch.randperm(len(y), generator=order_gen)
        total, count = 0.0, 0
        for index in range(batches_per_epoch):
            batch = order[index * config.batch_size: (index + 1) * config.batch_size][rank::world]
            xb, yb = x[batch].to(device, non_blocking=True), y[batch].to(device, non_blocking=True)

            def closure():
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(net(xb), yb)
                objective = loss
                if config.optimizer == "lbfgs" and config.weight_decay:
                    objective = loss + 0.5 * config.weight_decay * sum(p.square().sum() for p in params)
                objective.backward()
                if config.clip_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                closure.loss = float(loss.detach())
                return objective

            if config.optimizer == "lbfgs":
                optimizer.step(closure)
            else:
                closure()
                optimizer.step()
            if not math.isfinite(closure.loss):
                raise FloatingPointError(f"loss is {closure.loss} at epoch {epoch}: lower the learning rate")
            total += closure.loss * len(yb)
            count += len(yb)
            bar.update(1)
            bar.set_postfix_str(f"epoch {epoch + 1} loss {closure.loss:.4g}", refresh=False)
        sums = torch.tensor([total, count], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(sums)
        row = {"epoch": epoch + 1, "lr": lr, "loss": float(sums[0] / sums[1])}
        train_metrics = evaluate(net, x, y, dataset.num_classes, second_pass=config.second_pass)
        row["train_accuracy"] = train_metrics.pop("accuracy")
        row["test_accuracy"] = evaluate(net, dataset.x_test, dataset.y_test, dataset.num_classes, nc=False)["accuracy"]
        row.update(train_metrics)
        row["seconds"] = time.perf_counter() - start
        result.history.append(row)
    bar.close()
    result.seconds = time.perf_counter() - start
    if config.out and rank == 0:
        write_logs(result, config.out, f"train_{config.loss}")
    return result
