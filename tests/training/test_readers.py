"""The dataset file readers trust nothing: IDX headers, dtypes, sizes and counts are checked,
compressed input is read only as far as its header announces, CIFAR pickles cannot run code."""

import gzip
import os
import pickle
import tracemalloc

import numpy as np
import pytest

from ncfast import training as T
from ncfast.training import readers


def _idx_bytes(array, dtype_byte=8, ndim=None):
    ndim = array.ndim if ndim is None else ndim
    header = bytes([0, 0, dtype_byte, ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape[:ndim])
    return header + array.astype(np.uint8).tobytes()


def _write(path, data, compress):
    if compress:
        with gzip.open(path, "wb") as handle:
            handle.write(data)
    else:
        path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_round_trip(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, (5, 4, 3)).astype(np.uint8)
    path = _write(tmp_path / ("a.gz" if compress else "a"), _idx_bytes(array), compress)
    np.testing.assert_array_equal(readers.read_idx(path, 3), array)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("name,make,message", [
    ("magic", lambda a: b"\x08\x03" + _idx_bytes(a)[2:], "not an IDX file"),
    ("dtype-float", lambda a: _idx_bytes(a, dtype_byte=0x0D), r"0x0d \(float\)"),
    ("dtype-unknown", lambda a: _idx_bytes(a, dtype_byte=0x42), "0x42"),
    ("ndim", lambda a: _idx_bytes(a[0], ndim=2), "2 dimensions"),
    ("short-header", lambda a: _idx_bytes(a)[:9], "truncated"),
    ("short-data", lambda a: _idx_bytes(a)[:-7], "truncated"),
    ("trailing", lambda a: _idx_bytes(a) + b"\0", "data after"),
    ("empty", lambda a: _idx_bytes(a[:0]), "empty"),
])
def test_idx_refusals_name_the_file(tmp_path, compress, name, make, message):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    path = _write(tmp_path / f"{name}{'.gz' if compress else ''}", make(array), compress)
    with pytest.raises(ValueError, match=message) as error:
        readers.read_idx(path, 3)
    assert path in str(error.value)


def test_idx_header_beyond_the_limit_is_refused_before_reading(tmp_path):
    header = bytes([0, 0, 8, 3]) + b"".join(int(s).to_bytes(4, "big") for s in (60000, 28000, 28000))
    path = _write(tmp_path / "huge.gz", header, True)
    with pytest.raises(ValueError, match="limit"):
        readers.read_idx(path, 3)


def test_gzip_bomb_is_not_read_whole(tmp_path):
    # a 28×28 image announced, 256 MiB of zeros behind it: about 250 KB compressed
    path = tmp_path / "bomb.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(_idx_bytes(np.zeros((1, 28, 28), np.uint8)))
        zeros = bytes(1 << 20)
        for _ in range(256):
            handle.write(zeros)
    assert os.path.getsize(path) < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="data after"):
            readers.read_idx(str(path), 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20  # megabytes, not the 256 MiB the stream expands to


def test_corrupt_gzip(tmp_path):
    path = tmp_path / "broken.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(ValueError, match="broken.gz"):
        readers.read_idx(str(path), 1)


def _mnist(folder, train_images=6, train_labels=6, label_value=None):
    rng = np.random.default_rng(0)
    for prefix, images, labels in (("train", train_images, train_labels), ("t10k", 4, 4)):
        values = rng.integers(0, 10, labels) if label_value is None else np.full(labels, label_value)
        _write(folder / f"{prefix}-images-idx3-ubyte.gz", _idx_bytes(rng.integers(0, 256, (images, 28, 28))), True)
        _write(folder / f"{prefix}-labels-idx1-ubyte.gz", _idx_bytes(values), True)


def test_mnist_count_mismatch_and_label_range(tmp_path):
    _mnist(tmp_path, train_images=6, train_labels=5)
    with pytest.raises(ValueError, match="6 images but .*5 labels"):
        T.load_dataset("mnist", str(tmp_path))
    _mnist(tmp_path, label_value=12)
    with pytest.raises(ValueError, match="label 12"):
        T.load_dataset("mnist", str(tmp_path))


class _RunsACommand:
    """A pickle that, loaded by pickle.load, runs a shell command creating ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle(path, content, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as handle:
        pickle.dump(content, handle, protocol=protocol)
    return str(path)


def _batch(rows=3, classes=10, key=b"labels"):
    rng = np.random.default_rng(1)
    return {b"batch_label": b"training batch 1 of 5", b"data": rng.integers(0, 256, (rows, 3072)).astype(np.uint8),
            key: [int(v) for v in rng.integers(0, classes, rows)], b"filenames": [b"a.png"] * rows}


def test_malicious_cifar_pickle_does_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = _pickle(tmp_path / "data_batch_1", {b"data": _RunsACommand(marker), b"labels": [0]})
    with pytest.raises(ValueError, match="refused the global") as error:
        readers.read_cifar_batch(path, b"labels", 10)
    assert path in str(error.value) and not marker.exists()
    with open(path, "rb") as handle:  # the file does run a command under pickle.load: the test is real
        pickle.load(handle)
    assert marker.exists()


@pytest.mark.parametrize("protocol", range(2, pickle.HIGHEST_PROTOCOL + 1))
def test_cifar_batch_every_protocol(tmp_path, protocol):
    batch = _batch()
    images, labels = readers.read_cifar_batch(_pickle(tmp_path / "b", batch, protocol), b"labels", 10)
    np.testing.assert_array_equal(images, batch[b"data"].reshape(-1, 3, 32, 32))
    np.testing.assert_array_equal(labels, batch[b"labels"])


def test_cifar_batch_written_by_old_numpy(tmp_path):
    # the published files name numpy.core (numpy 1), not numpy._core
    data = pickle.dumps(_batch(), protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"cnumpy.core.multiarray\n_reconstruct" in data
    (tmp_path / "b").write_bytes(data)
    images, _ = readers.read_cifar_batch(str(tmp_path / "b"), b"labels", 10)
    assert images.shape == (3, 3, 32, 32)


@pytest.mark.parametrize("content,message", [
    ([1, 2, 3], "is a dict"),
    ({b"labels": [0]}, "b'data'"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
    ({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, "3072"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}, "1 labels for 2 images"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, "outside"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": "01"}, "labels"),
])
def test_cifar_content_is_checked(tmp_path, content, message):
    path = _pickle(tmp_path / "test_batch", content)
    with pytest.raises(ValueError, match=message) as error:
        readers.read_cifar_batch(path, b"labels", 10)
    assert path in str(error.value)


def test_cifar_truncated(tmp_path):
    path = tmp_path / "b"
    path.write_bytes(pickle.dumps(_batch())[:-100])
    with pytest.raises(ValueError, match="not a CIFAR python batch"):
        readers.read_cifar_batch(str(path), b"labels", 10)
