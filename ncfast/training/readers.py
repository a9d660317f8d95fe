"""Readers of the standard dataset files that trust nothing in them.

* MNIST's IDX files (LeCun et al.; ``.gz`` or not): the magic bytes, the data-type byte, the
  number of dimensions and the sizes are checked against the header, and exactly the number of
  bytes the header announces is read — a truncated file, trailing data or a header announcing
  more than :data:`MAX_FILE_BYTES` is refused, so a small compressed file cannot expand into
  memory without bound.
* CIFAR's python pickles: read by an unpickler that builds only what the format holds — dicts,
  lists, bytes, strings, numbers and numpy arrays — and refuses every other global, so a crafted
  file cannot execute code. The content is then checked: a dict with ``N × 3072`` uint8 images
  and ``N`` labels in range.

Every refusal is a ValueError naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
import zlib

import numpy as np

# the most bytes one file may hold (decompressed); the largest standard file, CIFAR-100's
# training pickle, holds about 150 MB
MAX_FILE_BYTES = 1 << 30
_IDX_TYPES = {0x08: "unsigned byte", 0x09: "signed byte", 0x0B: "short", 0x0C: "int", 0x0D: "float",
              0x0E: "double"}
CIFAR_IMAGE_VALUES = 3 * 32 * 32


def _read_exactly(handle, size: int, path: str, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise ValueError(f"{path}: the file ends inside {what} ({len(data)} of {size} bytes): truncated?")
    return data


def read_idx(path: str, ndim: int, limit: int = MAX_FILE_BYTES) -> np.ndarray:
    """The uint8 array (d1, ..., d_ndim) of an IDX file of unsigned bytes, gzip-compressed when
    ``path`` ends in ``.gz``."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as handle:
            magic = _read_exactly(handle, 4, path, "the IDX header")
            if magic[:2] != b"\0\0":
                raise ValueError(f"{path}: not an IDX file (it starts with {magic[:2].hex()}, expected 0000)")
            if magic[2] != 0x08:
                kind = _IDX_TYPES.get(magic[2], "not an IDX type")
                raise ValueError(f"{path}: IDX data type 0x{magic[2]:02x} ({kind}); MNIST files hold 0x08 "
                                 f"(unsigned byte)")
            if magic[3] != ndim:
                raise ValueError(f"{path}: {magic[3]} dimensions in the IDX header, expected {ndim}")
            shape = struct.unpack(f">{ndim}I", _read_exactly(handle, 4 * ndim, path, "the IDX sizes"))
            if 0 in shape:
                raise ValueError(f"{path}: the IDX header announces an empty array {shape}")
            size = math.prod(shape)
            if size > limit:
                raise ValueError(f"{path}: the IDX header announces {size} bytes {shape}, more than the "
                                 f"{limit}-byte limit")
            data = _read_exactly(handle, size, path, f"the {shape} values")
            if handle.read(1):
                raise ValueError(f"{path}: data after the {size} bytes the IDX header announces")
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot be read ({error})") from None
    return np.frombuffer(data, np.uint8).reshape(shape)


def _numpy_global(modules: tuple, name: str):
    for module in modules:  # numpy 2 keeps its internals in numpy._core, numpy 1 in numpy.core
        try:
            return getattr(__import__(module, fromlist=[name]), name)
        except (ImportError, AttributeError):
            continue
    return None


# the only globals a CIFAR pickle refers to: numpy's array and scalar reconstruction (older numpy
# writes numpy.core, numpy 2 numpy._core; protocol 5 writes _frombuffer) and, at protocol 2,
# Python 3's way of writing bytes
_RECONSTRUCT = _numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
_FROMBUFFER = _numpy_global(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
_SCALAR = _numpy_global(("numpy._core.multiarray", "numpy.core.multiarray"), "scalar")


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """How Python 3 writes bytes at pickle protocol 2 (``_codecs.encode(text, "latin1")``),
    admitted for that one encoding only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy.core.multiarray", "scalar"): _SCALAR,
    ("numpy._core.multiarray", "scalar"): _SCALAR,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
}


class _CifarUnpickler(pickle.Unpickler):
    """Builds dicts, lists, tuples, bytes, strings, numbers and numpy arrays; nothing else."""

    def find_class(self, module: str, name: str):
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"refused the global {module}.{name}: a CIFAR file holds only "
                                         f"dicts, lists, bytes, numbers and numpy arrays")
        return found

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused a persistent id: a CIFAR file has none")


def _labels(batch: dict, key: bytes, count: int, classes: int, path: str) -> np.ndarray:
    raw = batch.get(key)
    if isinstance(raw, np.ndarray) and raw.dtype.kind in "iu" and raw.ndim == 1:
        labels = raw.astype(np.int64)
    elif isinstance(raw, list) and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in raw):
        labels = np.array(raw, dtype=np.int64) if raw else np.zeros(0, np.int64)
    else:
        raise ValueError(f"{path}: {key!r} should be a list of integer labels, got {type(raw).__name__}")
    if len(labels) != count:
        raise ValueError(f"{path}: {len(labels)} labels for {count} images")
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise ValueError(f"{path}: labels span [{labels.min()}, {labels.max()}], outside [0, {classes})")
    return labels


def read_cifar_batch(path: str, label_key: bytes, classes: int, limit: int = MAX_FILE_BYTES):
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) of one CIFAR python pickle, read without
    executing anything it contains."""
    size = os.path.getsize(path)
    if size > limit:
        raise ValueError(f"{path}: {size} bytes, more than the {limit}-byte limit")
    try:
        with open(path, "rb") as handle:
            batch = _CifarUnpickler(handle, encoding="bytes").load()
    except Exception as error:  # whatever a malformed or hostile stream raises, it is refused the same way
        raise ValueError(f"{path}: not a CIFAR python batch ({type(error).__name__}: {error})") from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: a CIFAR batch is a dict, this file holds a {type(batch).__name__}")
    data = batch.get(b"data")
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == CIFAR_IMAGE_VALUES):
        got = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise ValueError(f"{path}: b'data' should be a uint8 array (N, {CIFAR_IMAGE_VALUES}), got {got}")
    labels = _labels(batch, label_key, data.shape[0], classes, path)
    return data.reshape(-1, 3, 32, 32), labels
