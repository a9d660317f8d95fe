"""``ncfast metrics FEATURES.npy LABELS.npy [--weight W.npy] [--bias b.npy] [--json]``:
neural-collapse metrics of saved features, streamed from memory-mapped ``.npy`` files."""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from torch import Tensor

from ..ncstats import NCStats
from .common import CLIError

CLI_HELP = "Neural-collapse metrics of saved features (N, d) and labels (N,) streamed from .npy files."


def add_arguments(parser) -> None:
    parser.add_argument("features", help="features, a .npy array (N, d) of floats (memory-mapped)")
    parser.add_argument("labels", help="class labels, a .npy array (N,) of integers in [0, K)")
    parser.add_argument("--weight", help="classifier weight, a .npy array (K, d): enables NC2-NC4, NCC, margins")
    parser.add_argument("--bias", help="classifier bias, a .npy array (K,)")
    parser.add_argument("--num-classes", type=int, default=None, help="K (default: largest label + 1)")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows read per chunk (default 8192)")
    parser.add_argument("--numerical-rank", action="store_true", help="also the numerical rank (K·d² memory)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _load(path: str, name: str, ndim: int):
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CLIError(f"{name}: no such file: {path}") from None
    except (ValueError, OSError) as error:
        raise CLIError(f"{name}: cannot read {path} as a .npy array ({error})") from None
    if array.ndim != ndim:
        raise CLIError(f"{name}: expected a {ndim}-D array, got shape {array.shape} in {path}")
    return array


def _progress(label: str, done: int, total: int, quiet: bool) -> None:
    if quiet:
        return
    width = 30
    filled = width * done // max(total, 1)
    end = "\n" if done >= total else ""
    print(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}", end=end, file=sys.stderr, flush=True)


def _float_tensor(chunk) -> Tensor:
    dtype = chunk.dtype if chunk.dtype in (np.float16, np.float32, np.float64) else np.float32
    return torch.from_numpy(np.array(chunk, dtype=dtype))  # a writable copy of the memory-mapped rows


def run(args) -> int:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    features = _load(args.features, "features", 2)
    labels = _load(args.labels, "labels", 1)
    if not np.issubdtype(features.dtype, np.floating):
        raise CLIError(f"features: expected floating-point values, got {features.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise CLIError(f"labels: expected integer class labels, got {labels.dtype}")
    N, d = features.shape
    if labels.shape[0] != N:
        raise CLIError(f"labels: {labels.shape[0]} labels for {N} feature rows")
    if N == 0:
        raise CLIError("features: the array has no rows")
    chunks = [(start, min(start + args.batch_size, N)) for start in range(0, N, args.batch_size)]
    low = min(int(labels[a:b].min()) for a, b in chunks)
    high = max(int(labels[a:b].max()) for a, b in chunks)
    num_classes = args.num_classes if args.num_classes is not None else high + 1
    if low < 0 or high >= num_classes:
        raise CLIError(f"labels: values span [{low}, {high}], outside [0, {num_classes})")
    if num_classes < 2:
        raise CLIError(f"labels: need at least 2 classes, got {num_classes}")
    weight = bias = None
    if args.weight is not None:
        weight = torch.from_numpy(np.array(_load(args.weight, "weight", 2), dtype=np.float64))
        if weight.shape != (num_classes, d):
            raise CLIError(f"weight: expected shape ({num_classes}, {d}), got {tuple(weight.shape)}")
    if args.bias is not None:
        if weight is None:
            raise CLIError("bias: needs --weight")
        bias = torch.from_numpy(np.array(_load(args.bias, "bias", 1), dtype=np.float64))
        if bias.shape != (num_classes,):
            raise CLIError(f"bias: expected shape ({num_classes},), got {tuple(bias.shape)}")

    def stream(label: str, sink) -> None:
        for i, (a, b) in enumerate(chunks):
            try:
                sink.update(_float_tensor(features[a:b]), torch.from_numpy(np.array(labels[a:b], dtype=np.int64)))
            except ValueError as error:
                raise CLIError(f"rows {a}..{b - 1}: {error}") from None
            _progress(label, i + 1, len(chunks), args.quiet)

    stats = NCStats(num_classes, d)
    second_needed = weight is not None or args.numerical_rank
    stream("pass 1/2" if second_needed else "pass 1/1", stats)
    try:
        second = stats.second_pass(weight, bias, numerical_rank=args.numerical_rank) if second_needed else None
        if second is not None:
            stream("pass 2/2", second)
        metrics = stats.compute(weight, bias, second_pass=second)
    except ValueError as error:
        raise CLIError(str(error)) from None
    if args.json:
        print(json.dumps(metrics.as_dict()))
    else:
        print(metrics)
    return 0
