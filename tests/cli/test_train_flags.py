"""``ncfast train`` checks every flag and every data file before the first epoch: a bad one is
exit code 2 and one line on stderr naming it, nothing on stdout, no training, no logs."""

import gzip
import os
import pickle

import numpy as np
import pytest

import ncfast.cli.train
from ncfast.cli import main


class _RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _idx(path, array, dtype_byte=8):
    header = bytes([0, 0, dtype_byte, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def _mnist(folder, images=(6, 6), labels=(6, 6), truncate=False, dtype_byte=8, bomb=False):
    rng = np.random.default_rng(0)
    for prefix, n_images, n_labels in zip(("train", "t10k"), images, labels):
        _idx(folder / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n_images, 28, 28)), dtype_byte)
        _idx(folder / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n_labels))
    target = folder / "train-images-idx3-ubyte.gz"
    if truncate:  # a short file: the header announces more images than follow
        data = gzip.decompress(target.read_bytes())
        target.write_bytes(gzip.compress(data[:-100]))
    if bomb:  # the announced images, then 64 MiB of zeros
        data = gzip.decompress(target.read_bytes())
        with gzip.open(target, "wb", compresslevel=1) as handle:
            handle.write(data)
            for _ in range(64):
                handle.write(bytes(1 << 20))
    return ["--dataset", "mnist", "--data-dir", str(folder)]


def _cifar(folder, first=None):
    rng = np.random.default_rng(1)
    (folder / "cifar-10-batches-py").mkdir()
    for index, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        content = {b"data": rng.integers(0, 256, (2, 3072)).astype(np.uint8), b"labels": [0, 1]}
        with open(folder / "cifar-10-batches-py" / name, "wb") as handle:
            pickle.dump(first if (index == 0 and first is not None) else content, handle)
    return ["--dataset", "cifar10", "--data-dir", str(folder), "--model", "resnet18", "--width", "0.0625"]


def _a_file(folder):
    path = folder / "a_file"
    path.write_text("not a folder")
    return ["--out", str(path)]


# case -> (flags given a scratch folder, what the error line names)
BAD_FLAGS = {
    "lr-inf": (lambda p: ["--lr", "inf"], "lr"),
    "lr-negative": (lambda p: ["--lr", "-0.1"], "lr"),
    "momentum-nan": (lambda p: ["--momentum", "nan"], "momentum"),
    "momentum-one": (lambda p: ["--momentum", "1"], "momentum"),
    "weight-decay-negative": (lambda p: ["--weight-decay=-1e-4"], "weight_decay"),
    "clip-grad-norm-negative": (lambda p: ["--clip-grad-norm", "-1"], "clip_grad_norm"),
    "clip-grad-norm-zero": (lambda p: ["--clip-grad-norm", "0"], "clip_grad_norm"),
    "train-size-negative": (lambda p: ["--train-size", "-5"], "train_size"),
    "train-size-missing-classes": (lambda p: ["--train-size", "5"], "train_size"),
    "last-batch-of-one-batch-norm": (lambda p: ["--train-size", "129"], "batch_size"),
    "feature-dim-0": (lambda p: ["--feature-dim", "0"], "feature_dim"),
    "depth-negative": (lambda p: ["--depth", "-1"], "depth"),
    "width-0": (lambda p: ["--width", "0"], "width"),
    "width-nan": (lambda p: ["--width", "nan"], "width"),
    "step-size-0": (lambda p: ["--step-size", "0"], "step_size"),
    "seed-negative": (lambda p: ["--seed", "-1"], "seed"),
    "gaussian-classes-1": (lambda p: ["--dataset", "gaussian", "--gaussian-classes", "1"], "gaussian_classes"),
    "gaussian-dim-0": (lambda p: ["--dataset", "gaussian", "--gaussian-dim", "0"], "gaussian_dim"),
    "device-meta": (lambda p: ["--device", "meta"], "device"),
    "device-unknown": (lambda p: ["--device", "tpu:0"], "device"),
    "device-cuda-absent": (lambda p: ["--device", "cuda:64"], "device"),
    "gamma-wrong-loss": (lambda p: ["--loss", "ce", "--gamma", "2"], "gamma"),
    "resnet18-on-vectors": (lambda p: ["--model", "resnet18"], "resnet18"),
    "out-is-a-file": (_a_file, "a_file"),
    "out-under-a-file": (lambda p: ["--out", _a_file(p)[1] + "/logs"], "a_file"),
    "mnist-short-file": (lambda p: _mnist(p, truncate=True), "train-images-idx3-ubyte.gz"),
    "mnist-count-mismatch": (lambda p: _mnist(p, labels=(5, 6)), "5 labels"),
    "mnist-idx-dtype": (lambda p: _mnist(p, dtype_byte=0x0D), "0x0d"),
    "mnist-gzip-bomb": (lambda p: _mnist(p, bomb=True), "data after"),
    "cifar-not-a-dict": (lambda p: _cifar(p, first=[1, 2, 3]), "data_batch_1"),
    "cifar-malicious": (lambda p: _cifar(p, first={b"data": _RunsACommand(p / "ran"), b"labels": [0]}), "data_batch_1"),
}


@pytest.fixture
def no_training(monkeypatch):
    """Fails the test if an epoch could start: the command must refuse before calling train."""
    def train(*args, **kwargs):
        raise AssertionError("training started")
    monkeypatch.setattr(ncfast.cli.train, "train", train)


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_is_one_line_exit_2_before_any_epoch(case, tmp_path, capsys, no_training):
    flags, argument = BAD_FLAGS[case]
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    argv = ["train", "--out", str(tmp_path / "out")] + flags(scratch)
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ncfast train: error: ") and argument in lines[0]
    assert out == ""
    assert not (tmp_path / "out").exists()  # nothing written
    assert not (scratch / "ran").exists()  # the malicious pickle's command did not run


def test_good_flags_still_train(tmp_path, capsys):
    """The checks refuse only what is wrong: the edges of each range are accepted."""
    argv = ["train", "--epochs", "1", "--width", "0.25", "--feature-dim", "1", "--depth", "1", "--momentum", "0",
            "--weight-decay", "0", "--clip-grad-norm", "1e-3", "--train-size", "40", "--batch-size", "13",
            "--no-batch-norm", "--seed", "0", "--device", "cpu", "--quiet", "--out", str(tmp_path / "new" / "folder")]
    assert main(argv) == 0
    assert (tmp_path / "new" / "folder" / "train_ce.json").exists()


@pytest.mark.gpu
def test_cuda_devices_this_machine_has(tmp_path, capsys):
    import torch

    from ncfast.training.config import check_device

    check_device("device", "cuda")
    check_device("device", f"cuda:{torch.cuda.device_count() - 1}")
    with pytest.raises(ValueError, match="device"):
        check_device("device", f"cuda:{torch.cuda.device_count()}")
    argv = ["train", "--epochs", "2", "--width", "0.25", "--feature-dim", "16", "--device", "cuda:0", "--quiet",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    assert "train acc" in capsys.readouterr().out
