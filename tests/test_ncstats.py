"""Streaming NC statistics against the float64 two-pass reference."""

import json
import os
import socket

import numpy as np
import pytest
import torch

import ncfast
from ncfast import NCMetrics, NCSecondPass, NCStats, nc_metrics
from ncfast.cli import main as cli_main
from ncfast.reference.ncstats import nc_metrics_two_pass
from tolerances import NC

TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

BACKENDS = ["cpp", "torch"] + (["triton"] if TRITON_INTERPRET else [])
FIRST_PASS = ("nc1", "equinorm_means", "equiangularity_means", "max_angle_means", "cdnv")
CLASSIFIER = ("nc2", "nc3", "nc4", "equinorm_classifier", "equiangularity_classifier", "max_angle_classifier")


def collapsed(num_classes, dim, n, spread=1e-3, scale=100.0, dtype=torch.float32, weights=None, seed=0):
    """Features = class means with entries of size ~scale plus N(0, spread²) noise; a classifier close to
    the means and a bias that nearly cancels W μ_G (so NC4 is small, as after training)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, dtype=torch.float64, generator=g) * scale
    if weights is None:
        target = torch.arange(n) % num_classes
    else:
        target = torch.multinomial(weights, n, replacement=True, generator=g)
        target[:num_classes] = torch.arange(num_classes)  # every class present
    target = target[torch.randperm(n, generator=g)]
    features = (means[target] + spread * torch.randn(n, dim, dtype=torch.float64, generator=g)).to(dtype)
    weight = means + 0.1 * torch.randn(num_classes, dim, dtype=torch.float64, generator=g)
    bias = -(weight @ features.double().mean(0)) + 0.01 * torch.randn(num_classes, dtype=torch.float64, generator=g)
    return features, target, weight, bias


def stream(features, target, batch, num_classes, backend="cpp"):
    stats = NCStats(num_classes, features.shape[1])
    with ncfast.use_backend(backend):
        for start in range(0, features.shape[0], batch):
            stats.update(features[start:start + batch], target[start:start + batch])
    return stats


def assert_close(metrics: NCMetrics, reference: dict, names, rtol):
    for name in names:
        got, want = getattr(metrics, name), reference[name]
        assert got is not None, name
        assert abs(got - want) <= rtol * abs(want), (name, got, want, abs(got - want) / abs(want))


# --------------------------------------------------------------------------------------------
# accuracy in the collapsed regime
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_collapsed_fp32_matches_two_pass(backend):
    # The collapsed regime in fp32: K=10, d=64, N=4000, batches of 333, means ~1e2, spread 1e-3: NC1..NC4 to 1e-4.
    features, target, weight, bias = collapsed(10, 64, 4000)
    reference = nc_metrics_two_pass(features, target, 10, weight, bias)
    assert reference["nc1"] < 1e-9  # really collapsed
    metrics = stream(features, target, 333, 10, backend).compute(weight, bias)
    assert_close(metrics, reference, FIRST_PASS + CLASSIFIER, NC[torch.float32])


def test_raw_moments_would_fail_here():
    # Why the Chan update: E[hhᵀ] − Σ n_k μ_k μ_kᵀ/N loses every digit of Σ_W in this regime in
    # float32 and most of them in float64; the streaming state (float32 Grams) keeps them.
    features, target, _, _ = collapsed(10, 64, 4000)
    h = features.double()
    means = torch.stack([h[target == k].mean(0) for k in range(10)])
    counts = torch.bincount(target).double()
    truth = (h - means[target]).T @ (h - means[target])
    norm = torch.linalg.matrix_norm
    raw32 = features.T @ features - (means.T * counts).float() @ means.float()
    raw64 = h.T @ h - (means.T * counts) @ means
    ours = norm(stream(features, target, 333, 10).within_scatter - truth) / norm(truth)
    assert norm(raw32.double() - truth) / norm(truth) > 1
    assert norm(raw64 - truth) / norm(truth) > 10 * ours
    assert ours < 1e-6


def test_high_dimension_nc1():
    # d=2048 ≫ K=10: Σ_B has rank 9; NC1 through the thin SVD of M̄ to 1e-3.
    features, target, _, _ = collapsed(10, 2048, 600, spread=1e-2)
    reference = nc_metrics_two_pass(features, target, 10, pinv_via_means=True)
    metrics = stream(features, target, 100, 10).compute()
    assert_close(metrics, reference, ("nc1",), 1e-3)


def test_more_classes_than_dims_unbalanced_batch_of_one():
    # K=300 > d=32, unbalanced classes, batches of random sizes including 1: 1e-6.
    K, d = 300, 32
    weights = torch.linspace(1, 10, K, dtype=torch.float64)
    features, target, weight, bias = collapsed(K, d, 3000, spread=1e-2, weights=weights)
    reference = nc_metrics_two_pass(features, target, K, weight, bias)
    stats = NCStats(K, d)
    g = torch.Generator().manual_seed(1)
    start = 0
    while start < features.shape[0]:
        size = 1 if start % 5 == 0 else int(torch.randint(1, 200, (), generator=g))
        stats.update(features[start:start + size], target[start:start + size])
        start += size
    assert_close(stats.compute(weight, bias), reference, FIRST_PASS + CLASSIFIER, 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_dtypes_and_backends(backend, dtype):
    # Awkward sizes: d not a multiple of the column block, batches missing classes.
    features, target, weight, bias = collapsed(7, 67, 301, spread=1e-2, scale=10.0, dtype=dtype)
    reference = nc_metrics_two_pass(features, target, 7, weight, bias)
    metrics = stream(features, target, 29, 7, backend).compute(weight, bias)
    assert_close(metrics, reference, FIRST_PASS + CLASSIFIER, NC[dtype])


def test_backends_agree_and_state_is_float64():
    features, target, _, _ = collapsed(5, 70, 200, spread=0.1, dtype=torch.float64)
    states = [stream(features, target, 37, 5, b) for b in BACKENDS]
    for s in states:
        assert s.within_scatter.dtype == torch.float64 and s.means.dtype == torch.float64
        norm = torch.linalg.matrix_norm
        assert norm(s.within_scatter - states[0].within_scatter) <= 1e-12 * norm(states[0].within_scatter)
        torch.testing.assert_close(s.means, states[0].means, rtol=1e-14, atol=0)
        torch.testing.assert_close(s.counts, states[0].counts, rtol=0, atol=0)


def test_deterministic_and_thread_count_independent():
    # 8.5M values: enough for the C++ kernel to use two threads.
    features, target, _, _ = collapsed(10, 520, 16400, spread=0.1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = stream(features, target, 16400, 10)
        torch.set_num_threads(max(threads, 2))
        multi = stream(features, target, 16400, 10)
        again = stream(features, target, 16400, 10)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(multi.within_scatter, again.within_scatter)
    # The batch kernel owns whole columns per thread: identical sums for any thread count;
    # the float32 Gram of the centred rows (oneDNN) gives the same bits on 1 and 2 threads.
    assert torch.equal(single.means, multi.means)
    assert torch.equal(single.class_sq, multi.class_sq)
    assert torch.equal(single.within_scatter, multi.within_scatter)


# --------------------------------------------------------------------------------------------
# merge, one-shot, state_dict, all_reduce
# --------------------------------------------------------------------------------------------
def test_merge_and_one_shot_match_reference():
    features, target, weight, bias = collapsed(6, 40, 900, spread=0.05, dtype=torch.float64)
    reference = nc_metrics_two_pass(features, target, 6, weight, bias)
    names = FIRST_PASS + CLASSIFIER
    a = stream(features[:350], target[:350], 64, 6)
    b = stream(features[350:], target[350:], 100, 6)
    assert_close(a.merge(b).compute(weight, bias), reference, names, 1e-8)
    whole = stream(features, target, 900, 6).compute(weight, bias)
    assert_close(whole, reference, names, 1e-8)
    one_shot = nc_metrics(features, target, weight, bias, numerical_rank=True)
    assert_close(one_shot, reference, names + ("ncc_mismatch", "numerical_rank"), 1e-8)


def test_merge_with_states_missing_classes():
    features, target, _, _ = collapsed(4, 8, 400, spread=0.5, dtype=torch.float64)
    reference = nc_metrics_two_pass(features, target, 4)
    low, high = target < 2, target >= 2
    a = stream(features[low], target[low], 50, 4)
    b = stream(features[high], target[high], 50, 4)
    assert_close(a.merge(b).compute(), reference, FIRST_PASS, 1e-10)


def test_state_dict_round_trip():
    features, target, weight, bias = collapsed(5, 16, 300, spread=0.1)
    stats = stream(features[:200], target[:200], 50, 5)
    restored = NCStats(5, 16)
    restored.load_state_dict(stats.state_dict())
    stats.update(features[200:], target[200:])
    restored.update(features[200:], target[200:])
    assert stats.compute(weight, bias) == restored.compute(weight, bias)
    with pytest.raises(ValueError, match="state"):
        NCStats(5, 17).load_state_dict(stats.state_dict())
    broken = stats.state_dict()
    broken["means"] = broken["means"][:, :3]
    with pytest.raises(ValueError, match="means"):
        restored.load_state_dict(broken)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _all_reduce_worker(rank, world, port, path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        features, target, weight, bias = collapsed(6, 24, 1000, spread=0.05, dtype=torch.float64)
        half = slice(0, 480) if rank == 0 else slice(480, 1000)
        stats = stream(features[half], target[half], 100, 6)
        stats.all_reduce()
        second = stats.second_pass(weight, bias)
        second.update(features[half], target[half])
        second.all_reduce()
        metrics = stats.compute(weight, bias, second_pass=second)
        torch.save({"metrics": metrics.as_dict(), "state": stats.state_dict()}, f"{path}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_reduce_gloo_two_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_all_reduce_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    features, target, weight, bias = collapsed(6, 24, 1000, spread=0.05, dtype=torch.float64)
    reference = nc_metrics_two_pass(features, target, 6, weight, bias)
    for result in results:
        metrics = NCMetrics(**result["metrics"])
        assert_close(metrics, reference, FIRST_PASS + CLASSIFIER + ("ncc_mismatch",), 1e-8)
    for name, value in results[0]["state"].items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(results[1]["state"][name])), name


def test_all_reduce_needs_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        NCStats(3, 4).all_reduce()


# --------------------------------------------------------------------------------------------
# definitions, flags, second pass
# --------------------------------------------------------------------------------------------
def test_flags_follow_their_definitions():
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    features, target, weight, bias = collapsed(5, 12, 600, spread=0.3, dtype=torch.float64, weights=weights)
    stats = stream(features, target, 128, 5)
    default = stats.compute(weight, bias)
    assert stats.compute(nc1_per_class=False).nc1 == pytest.approx(5 * default.nc1, rel=1e-12)
    for flags in ({"global_mean": "classes"}, {"center_classifier": True}):
        reference = nc_metrics_two_pass(features, target, 5, weight, bias, **flags)
        assert_close(stats.compute(weight, bias, **flags), reference, FIRST_PASS + CLASSIFIER, 1e-9)
    with pytest.raises(ValueError, match="global_mean"):
        stats.compute(global_mean="median")


def test_perfect_collapse_to_simplex_etf():
    # Features exactly on a simplex ETF, classifier = the means: NC2 = NC3 = 0, max-angle = 0.
    K, d = 4, 6
    etf_rows = (torch.eye(K, dtype=torch.float64) - 1 / K) @ torch.eye(K, d, dtype=torch.float64)
    target = torch.arange(40) % K
    features = 3 * etf_rows[target] + 1e-6 * torch.randn(40, d, dtype=torch.float64)
    metrics = nc_metrics(features, target, 3 * etf_rows)
    assert metrics.nc2 == pytest.approx(0, abs=1e-12)
    assert metrics.nc3 == pytest.approx(0, abs=1e-6)
    assert metrics.max_angle_means == pytest.approx(0, abs=1e-6)
    assert metrics.equinorm_classifier == pytest.approx(0, abs=1e-12)
    assert metrics.ncc_mismatch == 0.0


def test_second_pass_against_reference():
    features, target, weight, bias = collapsed(8, 20, 1200, spread=10.0, scale=10.0, dtype=torch.float64)
    reference = nc_metrics_two_pass(features, target, 8, weight, bias)
    stats = stream(features, target, 100, 8)
    first, second = stats.second_pass(weight, bias, numerical_rank=True), stats.second_pass(weight, bias, numerical_rank=True)
    for start in range(0, 600, 70):
        first.update(features[start:min(start + 70, 600)], target[start:min(start + 70, 600)])
    second.update(features[600:], target[600:])
    metrics = stats.compute(weight, bias, second_pass=first.merge(second))
    assert metrics.ncc_mismatch == reference["ncc_mismatch"]
    assert 0 < metrics.ncc_mismatch < 1  # the data is not collapsed: some disagreement
    assert metrics.numerical_rank == pytest.approx(reference["numerical_rank"], rel=1e-9)
    width = 4.0 / first.bins
    for q, value in metrics.cosine_margin_quantiles.items():
        assert abs(value - reference["cosine_margin_quantiles"][q]) <= width + 1e-12, q
    assert metrics.cosine_margin_quantiles[0.0] == pytest.approx(float(reference["cosine_margins"].min()), abs=1e-12)
    histogram = metrics.cosine_margin_histogram
    assert sum(histogram["counts"]) == 1200 and len(histogram["edges"]) == first.bins + 1
    expected, _ = np.histogram(reference["cosine_margins"].numpy(), bins=first.bins, range=(-2, 2))
    assert np.abs(np.array(histogram["counts"]) - expected).sum() <= 4  # edge rounding only


def test_second_pass_must_see_the_same_data():
    features, target, weight, _ = collapsed(3, 4, 90, spread=0.1)
    stats = stream(features, target, 90, 3)
    second = stats.second_pass(weight)
    second.update(features[:50], target[:50])
    with pytest.raises(ValueError, match="same data"):
        stats.compute(weight, second_pass=second)


def test_metrics_table_and_dict():
    features, target, weight, bias = collapsed(3, 5, 60, spread=0.1)
    metrics = nc_metrics(features, target, weight, bias)
    table = str(metrics)
    for name in ("nc1", "nc2", "nc3", "nc4", "cdnv", "ncc_mismatch", "cosine_margin q=0.5"):
        assert name in table
    as_dict = metrics.as_dict()
    assert as_dict["nc1"] == metrics.nc1 and as_dict["num_samples"] == 60
    assert "nc2" not in str(nc_metrics(features, target))


def test_empty_and_single_row_batches():
    features, target, _, _ = collapsed(3, 6, 30, spread=0.1, dtype=torch.float64)
    stats = NCStats(3, 6)
    stats.update(features[:0], target[:0])
    assert stats.num_samples == 0
    for i in range(30):
        stats.update(features[i:i + 1], target[i:i + 1])
    reference = nc_metrics_two_pass(features, target, 3)
    assert_close(stats.compute(), reference, FIRST_PASS, 1e-10)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_batches_raise_and_leave_state_unchanged(backend):
    stats = NCStats(3, 4)
    good = torch.randn(5, 4)
    stats.update(good, torch.tensor([0, 1, 2, 0, 1]))
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in stats.state_dict().items()}
    nan = good.clone()
    nan[2, 1] = float("nan")
    inf = good.clone()
    inf[0, 3] = float("inf")
    cases = [
        (nan, torch.tensor([0, 1, 2, 0, 1]), ValueError, "features: contains NaN"),
        (inf, torch.tensor([0, 1, 2, 0, 1]), ValueError, "features: contains NaN or infinite"),
        (good, torch.tensor([0, 1, 3, 0, 1]), ValueError, "target: value 3 at index 2"),
        (good, torch.tensor([0, -1, 2, 0, 1]), ValueError, "target: value -1 at index 1"),
        (good[:, :3], torch.tensor([0, 1, 2, 0, 1]), ValueError, r"features: expected shape \(N, 4\)"),
        (good, torch.tensor([0, 1, 2]), ValueError, "target: expected shape"),
        (good.to(torch.int32), torch.tensor([0, 1, 2, 0, 1]), TypeError, "features: expected float32"),
        (good, torch.tensor([0.0, 1, 2, 0, 1]), TypeError, "target: expected integer"),
        (good.numpy(), torch.tensor([0, 1, 2, 0, 1]), TypeError, "features: expected a tensor"),
        (good.to("meta"), torch.tensor([0, 1, 2, 0, 1]), ValueError, "features: is on meta"),
    ]
    with ncfast.use_backend(backend):
        for features, target, error, message in cases:
            with pytest.raises(error, match=message):
                stats.update(features, target)
    for name, value in stats.state_dict().items():
        assert torch.equal(torch.as_tensor(value), torch.as_tensor(before[name])), name


def test_bad_construction_and_compute_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        NCStats(1, 4)
    with pytest.raises(TypeError, match="dim"):
        NCStats(3, 4.0)
    stats = NCStats(3, 4)
    stats.update(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 0, 1]))
    with pytest.raises(ValueError, match="1 of 3 classes have no samples"):
        stats.compute()
    stats.update(torch.randn(2, 4), torch.tensor([2, 2]))
    with pytest.raises(ValueError, match=r"weight: expected shape \(3, 4\)"):
        stats.compute(torch.randn(3, 5))
    with pytest.raises(ValueError, match="bias: given without weight"):
        stats.compute(bias=torch.randn(3))
    with pytest.raises(ValueError, match=r"bias: expected shape \(3,\)"):
        stats.compute(torch.randn(3, 4), torch.randn(4))
    with pytest.raises(ValueError, match="weight: contains NaN"):
        stats.compute(torch.full((3, 4), float("nan")))
    with pytest.raises(ValueError, match="other"):
        stats.merge(NCStats(3, 5))
    with pytest.raises(TypeError, match="second_pass"):
        stats.compute(second_pass=object())


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------
@pytest.fixture()
def saved(tmp_path):
    features, target, weight, bias = collapsed(4, 10, 500, spread=0.2, scale=10.0)
    paths = {name: tmp_path / f"{name}.npy" for name in ("features", "labels", "weight", "bias")}
    np.save(paths["features"], features.numpy())
    np.save(paths["labels"], target.numpy())
    np.save(paths["weight"], weight.numpy())
    np.save(paths["bias"], bias.numpy())
    return paths, (features, target, weight, bias)


def test_cli_metrics_json_matches_api(saved, capsys):
    paths, (features, target, weight, bias) = saved
    code = cli_main(["metrics", str(paths["features"]), str(paths["labels"]), "--weight", str(paths["weight"]),
                     "--bias", str(paths["bias"]), "--json", "--batch-size", "77"])
    out = capsys.readouterr()
    assert code == 0
    assert "pass 2/2" in out.err  # the progress bar
    got = json.loads(out.out)
    want = stream(features, target, 77, 4).compute(weight, bias)
    for name in FIRST_PASS + CLASSIFIER:
        assert got[name] == pytest.approx(getattr(want, name), rel=1e-12), name
    assert got["ncc_mismatch"] == nc_metrics_two_pass(features, target, 4, weight, bias)["ncc_mismatch"]


def test_cli_metrics_table(saved, capsys):
    paths, (features, target, _, _) = saved
    assert cli_main(["metrics", str(paths["features"]), str(paths["labels"]), "--quiet"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    nc1 = nc_metrics_two_pass(features, target, 4)["nc1"]
    line = next(line for line in out.out.splitlines() if line.startswith("nc1 "))
    assert float(line.split()[1]) == pytest.approx(nc1, rel=1e-5)


def test_cli_errors(saved, tmp_path, capsys):
    paths, (features, target, _, _) = saved
    f, y = str(paths["features"]), str(paths["labels"])
    short = tmp_path / "short.npy"
    np.save(short, target[:10].numpy())
    out_of_range = tmp_path / "range.npy"
    np.save(out_of_range, (target + 1).numpy())
    nan = tmp_path / "nan.npy"
    bad = features.numpy().copy()
    bad[321, 3] = np.nan
    np.save(nan, bad)
    cases = [
        ([str(tmp_path / "missing.npy"), y], "features: no such file"),
        ([f, str(short)], "labels: 10 labels for 500 feature rows"),
        ([f, str(out_of_range), "--num-classes", "4"], r"labels: values span \[1, 4\], outside \[0, 4\)"),
        ([str(nan), y, "--batch-size", "100"], "rows 300..399: features: contains NaN"),
        ([f, y, "--weight", str(paths["bias"])], "weight: expected a 2-D array"),
        ([f, y, "--bias", str(paths["bias"])], "bias: needs --weight"),
    ]
    for args, message in cases:
        assert cli_main(["metrics", *args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert __import__("re").search(message, err), err


# --------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_collapsed_matches_two_pass_with_tf32_requested(dtype):
    features, target, weight, bias = collapsed(10, 64, 4000, dtype=dtype)
    reference = nc_metrics_two_pass(features, target, 10, weight, bias)
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"  # the Gram must switch it off itself
    try:
        stats = NCStats(10, 64, device="cuda")
        for start in range(0, 4000, 333):
            stats.update(features[start:start + 333].cuda(), target[start:start + 333].cuda())
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        metrics = stats.compute(weight.cuda(), bias.cuda())
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
    assert_close(metrics, reference, FIRST_PASS + CLASSIFIER, NC[dtype])
    again = NCStats(10, 64, device="cuda").update(features.cuda(), target.cuda())
    assert torch.equal(again.means, NCStats(10, 64, device="cuda").update(features.cuda(), target.cuda()).means)


def test_nc_second_pass_is_exported():
    assert ncfast.NCSecondPass is NCSecondPass and "metrics" in __import__("ncfast.cli").cli.SUBCOMMANDS
    assert os.environ.get("TRITON_INTERPRET") != "1" or "triton" in ncfast.available_backends()
