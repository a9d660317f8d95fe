"""The trainer: data readers, models, fixed-ETF classifier, NC tracking, DDP (two gloo processes)."""

import gzip
import json
import math
import os
import pickle
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ncfast
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
    assert abs(float(data.x_train.std()) - 0.5) < 0.05  # N(0, I/4), seed 004 §3
    true = T.load_dataset("gaussian", gaussian_dim=50, gaussian_classes=4, gaussian_per_class=20,
                          gaussian_labels="true")
    assert true.x_train.std() > data.x_train.std()


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_reader(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28)), rng.integers(0, 10, 6)
    for prefix, n in (("train", 6), ("t10k", 6)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images[:n])
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels[:n])
    data = T.load_dataset("mnist", str(tmp_path))
    assert data.x_train.shape == (6, 1, 28, 28) and torch.equal(data.y_train, torch.from_numpy(labels))
    torch.testing.assert_close(data.x_train[2, 0] * 0.3081 + 0.1307, torch.from_numpy(images[2] / 255.0).float())


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reader(tmp_path, classes):
    rng = np.random.default_rng(1)
    folder = tmp_path / ("cifar-10-batches-py" if classes == 10 else "cifar-100-python")
    folder.mkdir()
    key = b"labels" if classes == 10 else b"fine_labels"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if classes == 10 else ["train", "test"]
    for name in names:
        batch = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), key: list(rng.integers(0, classes, 3))}
        with open(folder / name, "wb") as handle:
            pickle.dump(batch, handle)
    data = T.load_dataset(f"cifar{classes}", str(tmp_path))
    assert data.num_classes == classes and data.input_shape == (3, 32, 32)
    assert len(data.y_train) == (15 if classes == 10 else 3) and len(data.y_test) == 3


def test_resnet18_and_lbfgs_train_on_cifar_files(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as handle:
            pickle.dump({b"data": rng.integers(0, 256, (8, 3072)).astype(np.uint8),
                         b"labels": list(rng.integers(0, 10, 8))}, handle)
    for optimizer, lr in (("sgd", 0.05), ("adam", 1e-3), ("lbfgs", 0.5)):
        config = T.TrainConfig(dataset="cifar10", data_dir=str(tmp_path), model="resnet18", width=0.0625,
                               feature_dim=10, fixed_etf=True, optimizer=optimizer, lr=lr, epochs=2,
                               batch_size=20, quiet=True, threads=1)
        result = T.train(config)
        assert len(result.history) == 2 and all(math.isfinite(r["loss"]) for r in result.history)
        assert 0 <= result.final["nc1"] and result.final["train_accuracy"] >= 0.1


def test_missing_data_dir_is_a_value_error(tmp_path):
    with pytest.raises(ValueError, match="data_dir"):
        T.load_dataset("cifar10", None)
    with pytest.raises(ValueError, match="data_dir"):
        T.load_dataset("mnist", str(tmp_path))


@pytest.mark.parametrize("model,shape", [("mlp", (64,)), ("resnet18", (3, 8, 8))])
@pytest.mark.parametrize("bias", [True, False])
def test_fixed_etf_removes_exactly_kd_parameters(model, shape, bias):
    K, d = 10, 12
    learned = T.build_model(model, shape, K, feature_dim=d, width=0.125, bias=bias)
    fixed = T.build_model(model, shape, K, feature_dim=d, width=0.125, bias=bias, fixed_etf=True)
    assert T.trainable_parameters(learned) - T.trainable_parameters(fixed) == K * d
    x = torch.randn(5, *shape)
    assert fixed(x).shape == (5, K) and fixed.features(x).shape == (5, d)
    torch.testing.assert_close(fixed.classifier.weight, ncfast.simplex_etf(K, d))


def test_resnet18_is_the_cifar_variant():
    net = T.ResNet18(10, width=1.0)
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].stride == (1, 1)
    assert len(net.blocks) == 8 and net.classifier.in_features == 512
    # 11.17M parameters, the published CIFAR ResNet18 size
    assert 11_150_000 < T.trainable_parameters(net) < 11_200_000


def test_schedules_and_losses():
    assert T.lr_factor("step", 39, 200) == 1 and T.lr_factor("step", 40, 200) == pytest.approx(0.1)
    assert [T.lr_factor("multistep", e, 70) for e in (29, 30, 49, 50)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert T.lr_factor("cosine", 0, 10) == 1 and T.lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    z, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    torch.testing.assert_close(T.make_loss("ls")(z, y), torch.nn.functional.cross_entropy(z, y, label_smoothing=0.1))
    torch.testing.assert_close(T.make_loss("mse")(z, y), ncfast.rescaled_mse(z, y, kappa=1.0, beta=15.0))
    torch.testing.assert_close(T.make_loss("focal")(z, y), ncfast.focal_loss(z, y, gamma=3.0))
    with pytest.raises(ValueError, match="loss"):
        T.make_loss("hinge")


def test_evaluate_matches_one_shot_metrics():
    data = T.load_dataset("digits")
    model = T.build_model("mlp", data.input_shape, 10, feature_dim=16, width=0.25)
    model.eval()
    got = T.evaluate(model, data.x_train, data.y_train, 10, batch_size=100)
    with torch.no_grad():
        features = model.features(data.x_train)
        expected = ncfast.nc_metrics(features, data.y_train, model.classifier.weight, model.classifier.bias)
        accuracy = float((model(data.x_train).argmax(1) == data.y_train).double().mean())
    assert got["accuracy"] == pytest.approx(accuracy)
    for key in ("nc1", "nc2", "nc3", "nc4"):
        assert got[key] == pytest.approx(getattr(expected, key), rel=1e-5)


def test_fixed_etf_matches_learned_accuracy_on_digits():
    results = {}
    for fixed in (False, True):
        config = T.TrainConfig(epochs=40, batch_size=512, lr=0.2, weight_decay=5e-3, schedule="cosine",
                               feature_dim=32, fixed_etf=fixed, clip_grad_norm=2.0, quiet=True, threads=1)
        results[fixed] = T.train(config)
    learned, fixed = results[False], results[True]
    assert learned.trainable_parameters - fixed.trainable_parameters == 10 * 32
    assert learned.final["train_accuracy"] == fixed.final["train_accuracy"] == 1.0
    assert abs(learned.final["test_accuracy"] - fixed.final["test_accuracy"]) <= 0.01
    assert len(learned.history) == 40 and learned.history[-1]["nc1"] < learned.history[0]["nc1"]


def test_cli_train_writes_logs(tmp_path, capsys):
    from ncfast.cli import main

    assert main(["train", "--epochs", "3", "--width", "0.25", "--feature-dim", "16", "--loss", "focal",
                 "--out", str(tmp_path), "--quiet", "--second-pass"]) == 0
    assert "train acc" in capsys.readouterr().out
    log = json.loads((tmp_path / "train_focal.json").read_text())
    assert len(log["history"]) == 3 and log["config"]["loss"] == "focal"
    assert 0 <= log["history"][-1]["ncc_mismatch"] <= 1
    assert len((tmp_path / "train_focal.csv").read_text().splitlines()) == 4
    assert (tmp_path / "train_focal.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["train", "--dataset", "mnist", "--out", str(tmp_path)]) == 2


def test_cli_demo_plumbing(tmp_path, capsys):
    from ncfast.cli import main

    assert main(["demo", "--epochs", "2", "--threads", "1", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for label in ("CE", "focal g=3", "LS a=0.1", "MSE k=1 b=15"):
        assert label in out
    assert (tmp_path / "nc1_vs_epoch.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "demo_mse.json").read_text())["history"]) == 2


# ---------------------------------------------------------------------------------------------
# two gloo processes
# ---------------------------------------------------------------------------------------------
def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        data = T.load_dataset("digits", train_size=600)
        torch.manual_seed(0)
        model = T.build_model("mlp", data.input_shape, 10, feature_dim=16, width=0.25)
        fixed = T.evaluate(model, data.x_train, data.y_train, 10, batch_size=64)
        config = T.TrainConfig(train_size=600, epochs=2, batch_size=100, width=0.25, feature_dim=16,
                               batch_norm=False, lr=0.05, quiet=True)
        trained = T.train(config).final
        if rank == 0:
            torch.save({"fixed": fixed, "trained": trained}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_one_process_metrics(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    ddp = torch.load(out)
    data = T.load_dataset("digits", train_size=600)
    torch.manual_seed(0)
    model = T.build_model("mlp", data.input_shape, 10, feature_dim=16, width=0.25)
    single = T.evaluate(model, data.x_train, data.y_train, 10, batch_size=64)
    for key in ("accuracy", "nc1", "nc2", "nc3", "nc4", "cdnv"):  # one fixed model: same statistics
        assert ddp["fixed"][key] == pytest.approx(single[key], rel=1e-6), key
    # training: each global batch split over the two ranks, gradients averaged = one-process gradient
    config = T.TrainConfig(train_size=600, epochs=2, batch_size=100, width=0.25, feature_dim=16, batch_norm=False,
                           lr=0.05, quiet=True)
    one = T.train(config).final
    for key in ("loss", "train_accuracy", "nc1", "nc2", "nc3"):
        assert ddp["trained"][key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
