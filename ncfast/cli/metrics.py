"""``ncfast metrics FEATURES.npy LABELS.npy [--weight W.npy] [--bias b.npy] [--json]``:
neural-collapse metrics of saved features, streamed from memory-mapped ``.npy`` files.

Every malformed input (a missing, empty or non-``.npy`` file, a ``.npz`` archive, wrong
shapes or dtypes, d = 0, labels out of range or so large that K would not fit in memory,
non-finite values, metrics that come out non-finite) is one line on stderr and exit code 2;
label values are checked against K before anything sized by K is allocated.

numpy has no bfloat16. ``np.save`` of an ml_dtypes (JAX) bfloat16 array writes 2-byte raw values
(dtype ``V2``), and a torch bfloat16 tensor is saved as its bits (``t.view(torch.int16)``);
``--bfloat16`` reads such arrays (features, weight, bias) as bfloat16 and streams them as they
are. Without it a ``V2`` array is refused with a line that names the flag. ``.pt`` files are not
read (unpickling a file runs code)."""

from __future__ import annotations

import json

import numpy as np
import torch
from torch import Tensor

from ..ncstats import NCStats
from ..ncstats_checks import CLASS_SETS
from ..progress import progress_bar
from .common import CLIError

CLI_HELP = "Neural-collapse metrics of saved features (N, d) and labels (N,) streamed from .npy files."

#: feature dtypes streamed as they are (anything else floating is read as float32)
_STREAMED = (np.float16, np.float32, np.float64)
#: dtypes that hold bfloat16 bits under ``--bfloat16``: numpy's form of ml_dtypes' bfloat16, torch's view
_BFLOAT16_BITS = (np.dtype("V2"), np.dtype(np.int16), np.dtype(np.uint16))
_PAIRWISE = {"auto": None, "float32": torch.float32, "float64": torch.float64}


def add_arguments(parser) -> None:
    parser.add_argument("features", help="features, a .npy array (N, d) of floats (memory-mapped)")
    parser.add_argument("labels", help="class labels, a .npy array (N,) of integers in [0, K)")
    parser.add_argument("--weight", help="classifier weight, a .npy array (K, d): enables NC2-NC4, NCC, margins")
    parser.add_argument("--bias", help="classifier bias, a .npy array (K,)")
    parser.add_argument("--bfloat16", action="store_true",
                        help="read 2-byte raw arrays as bfloat16: dtype V2 (np.save of an ml_dtypes/JAX bfloat16 "
                             "array) or int16/uint16 (a torch bfloat16 tensor saved as t.view(torch.int16))")
    parser.add_argument("--num-classes", type=int, default=None, help="K (default: largest label + 1)")
    parser.add_argument("--classes", choices=CLASS_SETS, default="all",
                        help="all (default): every class needs samples; observed: the metrics over the classes "
                             "that have samples only (e.g. a vocabulary's unused tokens)")
    parser.add_argument("--pairwise-dtype", choices=sorted(_PAIRWISE), default="auto",
                        help="precision of the O(K²·d) pairwise metrics (auto: float64 up to 8192 classes)")
    parser.add_argument("--batch-size", type=int, default=8192, help="rows read per chunk (default 8192)")
    parser.add_argument("--numerical-rank", action="store_true", help="also the numerical rank (K·d² memory)")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _load(path: str, name: str, ndim: int) -> np.ndarray:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError:
        raise CLIError(f"{name}: no such file: {path}") from None
    except EOFError:
        raise CLIError(f"{name}: {path} is empty, not a .npy array") from None
    except (ValueError, OSError) as error:
        raise CLIError(f"{name}: cannot read {path} as a .npy array ({error})") from None
    if not isinstance(array, np.ndarray):  # np.load opens a .npz archive as a mapping
        array.close()
        raise CLIError(f"{name}: {path} is a .npz archive; expected a .npy array (np.save, not np.savez)")
    if array.ndim != ndim:
        raise CLIError(f"{name}: expected a {ndim}-D array, got shape {array.shape} in {path}")
    return array


def _float_array(path: str, name: str, ndim: int, bfloat16: bool) -> np.ndarray:
    """The memory-mapped array at ``path``, checked to hold floats (or bfloat16 bits)."""
    array = _load(path, name, ndim)
    if np.issubdtype(array.dtype, np.floating) or (bfloat16 and array.dtype in _BFLOAT16_BITS):
        return array
    if array.dtype == np.dtype("V2"):
        raise CLIError(f"{name}: {path} holds 2-byte raw values (dtype V2), as np.save writes a bfloat16 array "
                       f"(ml_dtypes, JAX); pass --bfloat16 to read them as bfloat16")
    raise CLIError(f"{name}: expected floating-point values, got {array.dtype}")


def _classifier_tensor(path: str, name: str, ndim: int, shape: tuple, bfloat16: bool) -> Tensor:
    array = _float_array(path, name, ndim, bfloat16)
    if array.shape != shape:
        raise CLIError(f"{name}: expected shape {shape}, got {array.shape}")
    return _float_tensor(array)


def _float_tensor(chunk: np.ndarray) -> Tensor:
    """A writable copy of the memory-mapped rows: float16/32/64 as they are, bfloat16 bits as
    bfloat16, any other float as float32."""
    if not np.issubdtype(chunk.dtype, np.floating):  # bfloat16 bits (see _float_array)
        return torch.from_numpy(np.array(chunk).view(np.int16)).view(torch.bfloat16)
    dtype = chunk.dtype if chunk.dtype in _STREAMED else np.float32
    return torch.from_numpy(np.array(chunk, dtype=dtype))


def _label_range(labels: np.ndarray, chunks) -> tuple[int, int]:
    """(smallest, largest) label as Python ints (exact for any integer dtype, uint64 included)."""
    low = min(int(labels[a:b].min()) for a, b in chunks)
    high = max(int(labels[a:b].max()) for a, b in chunks)
    return low, high


def _num_classes(requested, low: int, high: int, dim: int) -> int:
    """K, checked against the labels and against memory before anything is sized by it."""
    if requested is None:
        num_classes = high + 1
        # float64 means (K, d), counts and class sums: refuse what cannot be allocated.
        need = num_classes * (dim + 2) * 8
        physical = _physical_memory()
        if need > physical:
            raise CLIError(f"labels: the largest label, {high}, makes K = {num_classes} classes, whose statistics "
                           f"need {need / 2**30:.3g} GiB (this machine has {physical / 2**30:.3g} GiB); "
                           f"fix the labels or pass --num-classes")
    else:
        num_classes = requested
    if low < 0 or high >= num_classes:
        raise CLIError(f"labels: values span [{low}, {high}], outside [0, {num_classes})")
    if num_classes < 2:
        raise CLIError(f"labels: need at least 2 classes, got {num_classes}")
    return num_classes


def _physical_memory() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def run(args) -> int:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size: expected a positive integer, got {args.batch_size}")
    features = _float_array(args.features, "features", 2, args.bfloat16)
    labels = _load(args.labels, "labels", 1)
    if not np.issubdtype(labels.dtype, np.integer):
        raise CLIError(f"labels: expected integer class labels, got {labels.dtype}")
    N, d = features.shape
    if labels.shape[0] != N:
        raise CLIError(f"labels: {labels.shape[0]} labels for {N} feature rows")
    if N == 0:
        raise CLIError("features: the array has no rows")
    if d == 0:
        raise CLIError("features: the rows have no columns (d = 0)")
    chunks = [(start, min(start + args.batch_size, N)) for start in range(0, N, args.batch_size)]
    num_classes = _num_classes(args.num_classes, *_label_range(labels, chunks), d)
    weight = bias = None
    if args.weight is not None:
        weight = _classifier_tensor(args.weight, "weight", 2, (num_classes, d), args.bfloat16)
    if args.bias is not None:
        if weight is None:
            raise CLIError("bias: needs --weight")
        bias = _classifier_tensor(args.bias, "bias", 1, (num_classes,), args.bfloat16)

    def stream(label: str, sink) -> None:
        bar = progress_bar(len(chunks), label, enabled=not args.quiet)
        try:
            for a, b in chunks:
                try:
                    sink.update(_float_tensor(features[a:b]),
                                torch.from_numpy(np.array(labels[a:b], dtype=np.int64)))
                except ValueError as error:
                    raise CLIError(f"rows {a}..{b - 1}: {error}") from None
                bar.update(1)
        finally:
            bar.close()

    stats = NCStats(num_classes, d)
    second_needed = weight is not None or args.numerical_rank
    stream("pass 1/2" if second_needed else "pass 1/1", stats)
    try:
        second = None
        if second_needed:
            second = stats.second_pass(weight, bias, numerical_rank=args.numerical_rank, classes=args.classes)
            stream("pass 2/2", second)
        metrics = stats.compute(weight, bias, second_pass=second, classes=args.classes,
                                pairwise_dtype=_PAIRWISE[args.pairwise_dtype])
    except (ValueError, TypeError) as error:
        raise CLIError(str(error)) from None
    if args.json:
        print(json.dumps(metrics.as_dict()))
    else:
        print(metrics)
    return 0
