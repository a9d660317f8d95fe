"""The training loop: schedules, optimisers, per-epoch NC metrics, DDP (two gloo processes)."""

import math
import pickle

import numpy as np
import pytest
import torch

import ncfast
from ncfast import training as T


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


def test_schedules():
    assert T.lr_factor("step", 39, 200) == 1 and T.lr_factor("step", 40, 200) == pytest.approx(0.1)
    assert [T.lr_factor("multistep", e, 70) for e in (29, 30, 49, 50)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert T.lr_factor("cosine", 0, 10) == 1 and T.lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="schedule"):
        T.lr_factor("linear", 0, 10)


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


# ---------------------------------------------------------------------------------------------
# two gloo processes
# ---------------------------------------------------------------------------------------------
def _worker(rank, world, out):
    data = T.load_dataset("digits", train_size=600)
    torch.manual_seed(0)
    model = T.build_model("mlp", data.input_shape, 10, feature_dim=16, width=0.25)
    fixed = T.evaluate(model, data.x_train, data.y_train, 10, batch_size=64)
    config = T.TrainConfig(train_size=600, epochs=2, batch_size=100, width=0.25, feature_dim=16,
                           batch_norm=False, lr=0.05, quiet=True)
    trained = T.train(config).final
    if rank == 0:
        torch.save({"fixed": fixed, "trained": trained}, out)


def test_two_gloo_processes_give_one_process_metrics(tmp_path, gloo):
    out = str(tmp_path / "ddp.pt")
    gloo(_worker, 2, out)
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
