"""NCTracker: the metrics of the hooked classifier's input equal the one-shot ones, under two
gloo processes equal one process, and a disabled tracker does no hook work."""

import pytest
import torch

import ncfast
from ncfast import training as T

FIRST_PASS = ("nc1", "nc2", "nc3", "nc4", "cdnv", "equinorm_means", "equiangularity_means", "max_angle_means",
              "equinorm_classifier", "equiangularity_classifier", "max_angle_classifier")


def _digits_mlp(fixed_etf=False, train_size=None):
    """The trainer's digits MLP in float64 (a float64 Gram: streamed and one-shot statistics
    then agree to rounding), a few SGD steps in so that its classes are apart."""
    data = T.load_dataset("digits", train_size=train_size)
    torch.manual_seed(0)
    model = T.build_model("mlp", data.input_shape, 10, feature_dim=16, width=0.25, fixed_etf=fixed_etf).double()
    x = data.x_train.double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(20):
        optimizer.zero_grad()
        ncfast.cross_entropy(model(x), data.y_train).backward()
        optimizer.step()
    return model.eval(), x, data.y_train


def _tracked(model, x, y, batch_size, rank=0, world=1, **kwargs):
    tracker = ncfast.NCTracker(model.classifier, **kwargs)
    for second_pass in (False, True):
        with torch.no_grad(), tracker.track(second_pass=second_pass):
            for start in range(rank * batch_size, len(y), world * batch_size):
                tracker.observe(y[start:start + batch_size])
                model(x[start:start + batch_size])
    return tracker.compute()


@pytest.mark.parametrize("fixed_etf", [False, True])
def test_tracker_equals_nc_metrics_on_the_digits_mlp(fixed_etf):
    model, x, y = _digits_mlp(fixed_etf)
    got = _tracked(model, x, y, batch_size=100)
    with torch.no_grad():
        features = model.features(x)
    bias = model.classifier.bias
    expected = ncfast.nc_metrics(features, y, model.classifier.weight, None if bias is None else bias.detach())
    assert got.num_samples == expected.num_samples == len(y)
    for key in FIRST_PASS + ("ncc_mismatch",):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), rel=1e-10, abs=1e-12), key
    assert got.nc1 < 1  # a few steps in: the measured features are not noise
    for q, value in expected.cosine_margin_quantiles.items():
        assert got.cosine_margin_quantiles[q] == pytest.approx(value, rel=1e-10, abs=1e-12)


@pytest.mark.gpu
def test_tracker_on_cuda_equals_nc_metrics():
    model, x, y = _digits_mlp()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    got = _tracked(model, x, y, batch_size=100)
    assert model.classifier.weight.device.type == "cuda"
    with torch.no_grad():
        expected = ncfast.nc_metrics(model.features(x), y, model.classifier.weight, model.classifier.bias)
    for key in FIRST_PASS + ("ncc_mismatch",):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), rel=1e-10, abs=1e-12), key


def test_token_features_and_ignore_index():
    torch.manual_seed(1)
    layer = torch.nn.Linear(8, 5).double()
    h = torch.randn(6, 7, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (6, 7))
    y[0, :3] = -100
    y[4, 5] = -100
    tracker = ncfast.NCTracker(layer)
    with tracker.track():
        for i in range(0, 6, 2):
            tracker.observe(y[i:i + 2])
            layer(h[i:i + 2])
    keep = y.reshape(-1) != -100
    expected = ncfast.nc_metrics(h.reshape(-1, 8)[keep], y.reshape(-1)[keep], layer.weight.detach(), layer.bias.detach())
    got = tracker.compute()
    assert got.num_samples == int(keep.sum())
    for key in ("nc1", "nc2", "nc3", "nc4", "cdnv"):
        assert getattr(got, key) == pytest.approx(getattr(expected, key), rel=1e-10), key


def test_disabled_tracker_does_no_hook_work(monkeypatch):
    calls = []
    monkeypatch.setattr(ncfast.NCStats, "update", lambda *args: calls.append(args))
    layer = torch.nn.Linear(4, 3)
    tracker = ncfast.NCTracker(layer, enabled=False)
    with tracker.track():
        assert not layer._forward_pre_hooks
        tracker.observe(torch.tensor([0, 1]))
        layer(torch.randn(2, 4))
    assert calls == [] and tracker.compute() is None
    # enabled: the hook exists only inside track(), not during training steps
    tracker = ncfast.NCTracker(layer)
    layer(torch.randn(2, 4))
    assert not layer._forward_pre_hooks and calls == []
    with tracker.track():
        assert len(layer._forward_pre_hooks) == 1
        tracker.observe(torch.tensor([0, 1]))
        layer(torch.randn(2, 4))
    assert not layer._forward_pre_hooks and len(calls) == 1


def test_a_failed_pass_is_discarded_and_unhooked():
    layer = torch.nn.Linear(4, 3)
    tracker = ncfast.NCTracker(layer)
    with pytest.raises(RuntimeError, match="observe"):  # forward without targets
        with tracker.track():
            layer(torch.randn(2, 4))
    assert not layer._forward_pre_hooks and not tracker.tracking
    with pytest.raises(RuntimeError, match="compute: no finished pass"):
        tracker.compute()
    with pytest.raises(ValueError, match="target: has 3 entries"):
        with tracker.track():
            tracker.observe(torch.tensor([0, 1, 2]))
            layer(torch.randn(2, 4))
    assert not layer._forward_pre_hooks


def test_bad_use_raises_clear_errors():
    layer = torch.nn.Linear(4, 3)
    with pytest.raises(TypeError, match="layer"):
        ncfast.NCTracker(torch.nn.ReLU())
    with pytest.raises(ValueError, match="layer"):
        ncfast.NCTracker(torch.nn.Linear(4, 1))
    with pytest.raises(TypeError, match="ignore_index"):
        ncfast.NCTracker(layer, ignore_index=0.5)
    tracker = ncfast.NCTracker(layer)
    with pytest.raises(RuntimeError, match="inside"):
        tracker.observe(torch.tensor([0]))
    with pytest.raises(RuntimeError, match="first pass"):
        with tracker.track(second_pass=True):
            pass
    with tracker.track():
        with pytest.raises(RuntimeError, match="nest"):
            with tracker.track():
                pass
        with pytest.raises(TypeError, match="target"):
            tracker.observe([0, 1])
        tracker.observe(torch.tensor([0, 1]))
        with pytest.raises(RuntimeError, match="never used"):
            tracker.observe(torch.tensor([0, 1]))
        layer(torch.randn(2, 4))
        tracker.observe(torch.tensor([0, 7]))
        with pytest.raises(ValueError, match="target"):
            layer(torch.randn(2, 4))
        tracker.observe(torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="features: the classifier's input"):
            layer(input=torch.randn(2, 4))  # no positional input for the hook to see
    with pytest.raises(ValueError, match="classes have no samples"):
        tracker.compute()  # the pass above saw classes 0 and 1 only


# ---------------------------------------------------------------------------------------------
# two gloo processes
# ---------------------------------------------------------------------------------------------
def _worker(rank, world, out):
    model, x, y = _digits_mlp(train_size=600)
    metrics = _tracked(model, x, y, batch_size=50, rank=rank, world=world)
    torch.save(metrics.as_dict(), f"{out}.{rank}")


def test_two_gloo_processes_equal_one_process(tmp_path, gloo):
    out = str(tmp_path / "tracker")
    gloo(_worker, 2, out)
    model, x, y = _digits_mlp(train_size=600)
    single = _tracked(model, x, y, batch_size=50).as_dict()
    ranks = [torch.load(f"{out}.{rank}") for rank in range(2)]
    assert ranks[0] == ranks[1]  # every rank reports the metrics of all data, bit for bit
    assert ranks[0]["num_samples"] == single["num_samples"] == 600
    for key in FIRST_PASS + ("ncc_mismatch",):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-9, abs=1e-12), key
