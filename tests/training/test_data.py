"""The datasets: the embedded digits, Gaussian inputs, MNIST and CIFAR read from their files."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from ncfast import training as T


def test_digits_embedded_and_split():
    data = T.load_dataset("digits")
    assert data.num_classes == 10 and data.input_shape == (64,)
    assert len(data.y_train) + len(data.y_test) == 1797 and len(data.y_test) == 359
    assert torch.bincount(data.y_train, minlength=10).min() > 120
    again = T.load_dataset("digits")
    assert torch.equal(again.x_train, data.x_train) and torch.equal(again.y_test, data.y_test)
    shuffled = T.load_dataset("digits", random_labels=True)
    assert torch.equal(shuffled.x_train, data.x_train) and (shuffled.y_train != data.y_train).float().mean() > 0.8


def test_gaussian_data():
    data = T.load_dataset("gaussian", gaussian_dim=50, gaussian_classes=4, gaussian_per_class=20)
    assert data.x_train.shape == (80, 50) and torch.equal(torch.bincount(data.y_train), torch.full((4,), 20))
    assert abs(float(data.x_train.std()) - 0.5) < 0.05  # N(0, I/4), Wang et al. 2022 §3
    true = T.load_dataset("gaussian", gaussian_dim=50, gaussian_classes=4, gaussian_per_class=20,
                          gaussian_labels="true")
    assert true.x_train.std() > data.x_train.std()


def write_idx(path, array, dtype_byte=8):
    header = bytes([0, 0, dtype_byte, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def write_mnist(folder, images, labels):
    for prefix in ("train", "t10k"):
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)


def test_mnist_reader(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    write_mnist(tmp_path, images, labels)
    data = T.load_dataset("mnist", str(tmp_path))
    assert data.x_train.shape == (6, 1, 28, 28) and torch.equal(data.y_train, torch.from_numpy(labels))
    torch.testing.assert_close(data.x_train[2, 0] * 0.3081 + 0.1307, torch.from_numpy(images[2] / 255.0).float())


def write_cifar(folder, classes, rows, rng):
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (rows, 3072)).astype(np.uint8),
                 key: list(rng.integers(0, classes, rows))}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    return names


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reader(tmp_path, classes):
    rng = np.random.default_rng(1)
    folder = tmp_path / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir()
    names = write_cifar(folder, classes, 3, rng)
    data = T.load_dataset(f"cifar{classes}", str(tmp_path))
    assert data.num_classes == classes and data.input_shape == (3, 32, 32)
    assert len(data.y_train) == (15 if classes == 10 else 3) and len(data.y_test) == 3

    def pixels(name):
        with open(folder / name, "rb") as handle:
            batch = pickle.load(handle)
        return batch, torch.from_numpy(batch[b"data"].reshape(-1, 3, 32, 32).astype(np.float32) / 255.0)

    train = torch.cat([pixels(name)[1] for name in names[:-1]])
    test_batch, test = pixels(names[-1])
    assert torch.equal(data.y_test, torch.tensor(test_batch[b"labels" if classes == 10 else b"fine_labels"]))
    mean, std = train.mean((0, 2, 3), keepdim=True), train.std((0, 2, 3), keepdim=True)
    torch.testing.assert_close(data.x_test, (test - mean) / std)


def test_missing_data_dir_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        T.load_dataset("cifar10", None)
    with pytest.raises(ValueError, match="data_dir"):
        T.load_dataset("mnist", str(tmp_path))
