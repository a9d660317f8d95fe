"""NC statistics at vocabulary scale and shared between threads: the tiled O(K·d + d²)
compute against the dense float64 formulas, observed classes, arithmetic at any magnitude,
the lock, state validation, the class-tiled second pass."""

import json
import re
import threading

import numpy as np
import pytest
import torch

import ncfast
from ncfast import NCStats, ncstats_pairwise, ncstats_second
from ncfast.reference.ncstats import nc_metrics_dense, nc_metrics_two_pass

FIRST_PASS = ("nc1", "equinorm_means", "equiangularity_means", "max_angle_means", "cdnv")
CLASSIFIER = ("nc2", "nc3", "nc4", "equinorm_classifier", "equiangularity_classifier", "max_angle_classifier")


def _problem(K, d, n, seed=0, dtype=torch.float64, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(K, d, dtype=torch.float64, generator=g)
    target = torch.cat([torch.arange(K), torch.randint(0, K, (n - K,), generator=g)])
    target = target[torch.randperm(n, generator=g)]
    features = (means[target] + spread * torch.randn(n, d, dtype=torch.float64, generator=g)).to(dtype)
    weight = means + 0.3 * torch.randn(K, d, dtype=torch.float64, generator=g)
    bias = torch.randn(K, dtype=torch.float64, generator=g)
    return features, target, weight, bias


def _stream(features, target, K, batch=1000):
    stats = NCStats(K, features.shape[1])
    for start in range(0, features.shape[0], batch):
        stats.update(features[start:start + batch], target[start:start + batch])
    return stats


def _assert_metrics(metrics, reference, names, rtol):
    for name in names:
        got, want = getattr(metrics, name), reference[name]
        assert abs(got - want) <= rtol * abs(want), (name, got, want, abs(got - want) / abs(want))


# --------------------------------------------------------------------------------------------
# tiled compute against the dense formulas
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K, d, tile", [(10, 24, 4096), (300, 40, 128), (4000, 16, 1024)])
@pytest.mark.parametrize("flags", [{}, {"global_mean": "classes", "center_classifier": True, "nc1_per_class": False}])
def test_tiled_compute_matches_dense_formulas(monkeypatch, K, d, tile, flags):
    # K = 300 and 4000 > d: the eigendecomposition branch of NC1; tiles smaller than K (with
    # a ragged last one) exercise the upper-triangle sweep.
    monkeypatch.setattr(ncstats_pairwise, "TILE_ROWS", tile)
    monkeypatch.setattr(ncstats_pairwise, "BLOCK_ROWS", 700)
    features, target, weight, bias = _problem(K, d, 3 * K)
    stats = _stream(features, target, K)
    dense = nc_metrics_dense(stats.counts, stats.means, stats.within_scatter, stats.class_sq, weight, bias, **flags)
    metrics = stats.compute(weight, bias, pairwise_dtype=torch.float64, **flags)
    _assert_metrics(metrics, dense, FIRST_PASS + CLASSIFIER, 1e-10)
    assert metrics.classes_used == K
    # and the streamed state against the two-pass truth from all features at once
    if K <= 300:
        truth = nc_metrics_two_pass(features, target, K, weight, bias, **flags)
        _assert_metrics(metrics, truth, FIRST_PASS + CLASSIFIER, 1e-10)


def test_torch_tile_reduction_matches_cpp():
    features, target, weight, _ = _problem(500, 12, 1500)
    stats = _stream(features, target, 500)
    with ncfast.use_backend("torch"):
        by_torch = stats.compute(weight, pairwise_dtype=torch.float64)
    by_cpp = stats.compute(weight, pairwise_dtype=torch.float64)
    for name in ("max_angle_means", "cdnv", "max_angle_classifier"):
        assert getattr(by_torch, name) == pytest.approx(getattr(by_cpp, name), rel=1e-13)


def test_float32_tiles_within_their_error_bound():
    K, d = 3000, 64
    features, target, weight, _ = _problem(K, d, 2 * K)
    stats = _stream(features, target, K)
    exact = stats.compute(weight, pairwise_dtype=torch.float64)
    fast = stats.compute(weight, pairwise_dtype=torch.float32)
    bound = d * 2.0**-24  # on each cosine, hence on the max-angle's mean of |cos + 1/(K−1)|
    assert abs(fast.max_angle_means - exact.max_angle_means) <= bound
    assert abs(fast.max_angle_classifier - exact.max_angle_classifier) <= bound
    assert fast.cdnv == pytest.approx(exact.cdnv, rel=1e-5)
    assert abs(fast.equiangularity_means - exact.equiangularity_means) <= bound  # a std of the cosines
    assert fast.nc1 == exact.nc1 and fast.nc2 == exact.nc2  # d×d, float64
    with pytest.raises(ValueError, match="pairwise_dtype"):
        stats.compute(pairwise_dtype=torch.float16)


def test_float32_tiles_are_thread_count_independent():
    # Tiles of 1024² cosines: the reduction splits rows over two threads, oneDNN's product
    # (float32 on CPU) runs on both cores; a ragged last tile and diagonal tiles included.
    K, d = 2500, 64
    g = torch.Generator().manual_seed(3)
    unit = torch.nn.functional.normalize(torch.randn(K, d, generator=g), dim=1)
    norms = 1 + torch.rand(K, dtype=torch.float64, generator=g)
    variances = torch.rand(K, dtype=torch.float64, generator=g)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ncstats_pairwise.pairwise_sums(unit, norms, variances, 0.01, tile=1024)
        torch.set_num_threads(2)
        two = ncstats_pairwise.pairwise_sums(unit, norms, variances, 0.01, tile=1024)
    finally:
        torch.set_num_threads(threads)
    assert one == two
    assert one == ncstats_pairwise.pairwise_sums(unit, norms, variances, 0.01, tile=1024)
    exact = ncstats_pairwise.pairwise_sums(unit.double(), norms, variances, 0.01, tile=K)
    assert one == pytest.approx(exact, rel=1e-5)


def test_update_touches_only_the_batch_classes():
    # Batches of a few classes out of many: the result equals the two-pass truth, and classes
    # a batch does not hold keep their state bit for bit.
    K, d = 2000, 8
    features, target, _, _ = _problem(K, d, 4000)
    order = target.argsort(stable=True)  # batches of few, consecutive classes
    features, target = features[order], target[order]
    stats = NCStats(K, d)
    stats.update(features[:2000], target[:2000])
    before = stats.means[target[2000:].max() + 1:].clone()
    stats.update(features[2000:3000], target[2000:3000])
    untouched = stats.means[target[2000:].max() + 1:]
    assert torch.equal(untouched[-100:], before[-100:])
    stats.update(features[3000:], target[3000:])
    # the two-pass truth of the state
    means = torch.zeros(K, d, dtype=torch.float64).index_add_(0, target, features) / stats.counts[:, None]
    centred = features - means[target]
    assert torch.equal(stats.counts, torch.bincount(target, minlength=K).double())
    torch.testing.assert_close(stats.means, means, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(stats.within_scatter, centred.T @ centred, rtol=1e-12, atol=0)
    class_sq = torch.zeros(K, dtype=torch.float64).index_add_(0, target, (centred * centred).sum(1))
    torch.testing.assert_close(stats.class_sq, class_sq, rtol=1e-11, atol=0)


# --------------------------------------------------------------------------------------------
# observed classes
# --------------------------------------------------------------------------------------------
def test_observed_classes_at_32000():
    K, d, n = 32000, 6, 40000
    g = torch.Generator().manual_seed(3)
    missing = torch.randperm(K, generator=g)[:57]
    present = torch.ones(K, dtype=torch.bool)
    present[missing] = False
    classes = present.nonzero().flatten()
    target = classes[torch.cat([torch.arange(classes.numel()), torch.randint(0, classes.numel(), (n - classes.numel(),),
                                                                               generator=g)])]
    means = torch.randn(K, d, dtype=torch.float64, generator=g)
    features = means[target] + 0.1 * torch.randn(n, d, dtype=torch.float64, generator=g)
    weight = torch.randn(K, d, dtype=torch.float64, generator=g)
    bias = torch.randn(K, dtype=torch.float64, generator=g)
    stats = _stream(features, target, K, batch=8192)
    with pytest.raises(ValueError, match=r"57 of 32000 classes have no samples.*classes='observed'"):
        stats.compute()
    metrics = stats.compute(weight, bias, classes="observed", pairwise_dtype=torch.float64)
    assert metrics.classes_used == K - 57 and metrics.num_classes == K
    # the same data relabelled onto the observed classes only
    relabel = torch.full((K,), -1, dtype=torch.int64)
    relabel[classes] = torch.arange(classes.numel())
    compact = _stream(features, relabel[target], classes.numel(), batch=8192)
    expected = compact.compute(weight[classes], bias[classes], pairwise_dtype=torch.float64)
    _assert_metrics(metrics, vars(expected), FIRST_PASS + CLASSIFIER, 1e-12)


@pytest.mark.parametrize("flags", [{}, {"global_mean": "classes", "center_classifier": True}])
def test_observed_classes_in_the_second_pass(flags):
    features, target, weight, bias = _problem(6, 5, 300)
    keep = target != 2
    features, target = features[keep], target[keep]
    stats = _stream(features, target, 6)
    with pytest.raises(ValueError, match="classes='observed'"):
        stats.second_pass(weight, bias)
    second = stats.second_pass(weight, bias, classes="observed", global_mean=flags.get("global_mean", "samples"))
    second.update(features, target)
    metrics = stats.compute(weight, bias, classes="observed", second_pass=second, **flags)
    index = torch.tensor([0, 1, 3, 4, 5])
    truth = nc_metrics_two_pass(features, torch.searchsorted(index, target), 5, weight[index], bias[index], **flags)
    assert metrics.ncc_mismatch == truth["ncc_mismatch"]
    assert metrics.cosine_margin_quantiles[0.0] == pytest.approx(truth["cosine_margin_quantiles"][0.0], abs=1e-12)
    _assert_metrics(metrics, truth, FIRST_PASS + CLASSIFIER, 1e-10)


# --------------------------------------------------------------------------------------------
# second pass tiled over classes
# --------------------------------------------------------------------------------------------
def test_second_pass_tiles_match_one_tile(monkeypatch):
    features, target, weight, bias = _problem(50, 7, 600, spread=1.5)
    stats = _stream(features, target, 50)
    whole = stats.second_pass(weight, bias).update(features, target)
    monkeypatch.setattr(ncstats_second, "TILE_ELEMENTS", 600 * 7)  # 7 classes per tile, a ragged last one
    tiled = stats.second_pass(weight, bias).update(features, target)
    assert int(tiled.mismatches) == int(whole.mismatches) > 0
    assert torch.equal(tiled.histogram, whole.histogram)
    assert float(tiled.margin_min) == pytest.approx(float(whole.margin_min), abs=1e-14)
    truth = nc_metrics_two_pass(features, target, 50, weight, bias)
    assert int(tiled.mismatches) / 600 == truth["ncc_mismatch"]


def test_numerical_rank_memory_is_refused_with_an_estimate():
    stats = _stream(*_problem(20, 64, 100)[:2], 20)
    with pytest.raises(ValueError, match=r"numerical_rank: .*20·64²·8 bytes = 0\.0 GiB, above max_rank_bytes"):
        stats.second_pass(numerical_rank=True, max_rank_bytes=1000)
    assert stats.second_pass(numerical_rank=True, max_rank_bytes=20 * 64 * 64 * 8).class_grams.shape == (20, 64, 64)


# --------------------------------------------------------------------------------------------
# arithmetic at any magnitude
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("factor, dtype", [(1e19, torch.float32), (1e-30, torch.float32), (1.0, torch.float16),
                                           (1.0, torch.bfloat16), (1e140, torch.float64), (1e-150, torch.float64)])
def test_any_finite_magnitude_gives_the_float64_answer(backend, factor, dtype):
    features, target, weight, _ = _problem(7, 12, 700, spread=0.2)
    features = (features * factor).to(dtype)
    exact = features.to(torch.float64)  # the same values, in float64
    with ncfast.use_backend(backend):
        got = _stream(features, target, 7, batch=128).compute()
    truth = _stream(exact, target, 7, batch=128).compute()
    assert got.nc1 == pytest.approx(truth.nc1, rel=1e-6)
    assert got.cdnv == pytest.approx(truth.cdnv, rel=1e-6)


def test_float64_beyond_the_scatter_range_is_a_value_error():
    features, target, _, _ = _problem(3, 4, 30)
    stats = NCStats(3, 4)
    stats.update(features, target)
    before = stats.state_dict()
    with pytest.raises(ValueError, match="overflows float64"):
        stats.update(features * 1e160, target)
    for name in ("counts", "means", "within_scatter", "class_sq"):
        assert torch.equal(getattr(stats, name), before[name])


def test_non_finite_metrics_are_never_returned():
    stats = NCStats(3, 2)
    # two classes share a mean: the CDNV divides by a zero distance
    stats.update(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="cdnv: came out"):
        stats.compute(pairwise_dtype=torch.float64)


# --------------------------------------------------------------------------------------------
# one object, several threads
# --------------------------------------------------------------------------------------------
def test_two_threads_on_one_object_give_the_serial_result():
    # float64 features: the order the two threads' batches interleave in then moves the state
    # by rounding only (float32 Grams would move it by ~1e-5 from one order to another).
    features, target, weight, _ = _problem(9, 16, 1600)
    halves = [(features[:800], target[:800]), (features[800:], target[800:])]
    serial = NCStats(9, 16)
    for f, t in halves:
        for start in range(0, 800, 40):
            serial.update(f[start:start + 40], t[start:start + 40])
    expected = serial.compute(weight)
    for _ in range(50):
        shared = NCStats(9, 16)
        computed = []

        def feed(f, t):
            for start in range(0, 800, 40):
                shared.update(f[start:start + 40], t[start:start + 40])
                computed.append(shared.compute(weight) if start == 400 else None)

        threads = [threading.Thread(target=feed, args=half) for half in halves]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert torch.equal(shared.counts, serial.counts)
        for name in ("means", "within_scatter", "class_sq"):
            got, want = getattr(shared, name), getattr(serial, name)
            assert float((got - want).norm()) <= 1e-12 * float(want.norm()), name
        got = shared.compute(weight)
        for name in FIRST_PASS + CLASSIFIER:
            assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-9), name


def test_merge_while_updating_from_another_thread():
    features, target, _, _ = _problem(5, 6, 1000)
    for _ in range(50):
        a, b = _stream(features[:500], target[:500], 5, batch=50), NCStats(5, 6)
        worker = threading.Thread(target=lambda: [b.update(features[s:s + 50], target[s:s + 50])
                                                  for s in range(500, 1000, 50)])
        worker.start()
        a_copy = _stream(features[:500], target[:500], 5, batch=50)
        b.merge(a_copy)
        worker.join()
        assert torch.equal(b.counts, _stream(features, target, 5).counts)
        torch.testing.assert_close(b.within_scatter, _stream(features, target, 5).within_scatter, rtol=1e-12, atol=0)


# --------------------------------------------------------------------------------------------
# load_state_dict validates every field
# --------------------------------------------------------------------------------------------
def _bad_states():
    def edit(name, value):
        def make(state):
            state[name] = value(state[name]) if callable(value) else value
            return state
        return make

    asymmetric = torch.zeros(4, 4, dtype=torch.float64)
    asymmetric[0, 1] = 1.0
    return {
        "counts-negative": ("counts", edit("counts", lambda c: c - 100)),
        "counts-fractional": ("counts", edit("counts", lambda c: c + 0.5)),
        "counts-nan": ("counts", edit("counts", lambda c: c * float("nan"))),
        "counts-int": ("counts", edit("counts", lambda c: c.to(torch.int64))),
        "counts-shape": ("counts", edit("counts", lambda c: c[:2])),
        "means-complex": ("means", edit("means", lambda m: m.to(torch.complex128))),
        "means-inf": ("means", edit("means", lambda m: m + float("inf"))),
        "means-list": ("means", edit("means", lambda m: m.tolist())),
        "scatter-asymmetric": ("within_scatter", edit("within_scatter", asymmetric)),
        "scatter-not-psd": ("within_scatter", edit("within_scatter", lambda s: -s)),
        "class_sq-negative": ("class_sq", edit("class_sq", lambda c: -c - 1)),
        "num_classes": ("num_classes", edit("num_classes", 4)),
        "dim-float": ("dim", edit("dim", 4.0)),
    }


@pytest.mark.parametrize("case", sorted(_bad_states()))
def test_load_state_dict_rejects_each_bad_field(case):
    field, make = _bad_states()[case]
    features, target, _, _ = _problem(3, 4, 60)
    source = _stream(features, target, 3)
    stats = _stream(features[:30], target[:30], 3)
    before = stats.state_dict()
    with pytest.raises(ValueError, match=field):
        stats.load_state_dict(make(source.state_dict()))
    for name in ("counts", "means", "within_scatter", "class_sq"):
        assert torch.equal(getattr(stats, name), before[name])


def test_load_state_dict_none_and_round_trip():
    features, target, _, _ = _problem(3, 4, 60)
    source = _stream(features, target, 3)
    stats = NCStats(3, 4)
    with pytest.raises(TypeError, match="state"):
        stats.load_state_dict(None)
    stats.load_state_dict(source.state_dict())
    assert stats.compute().nc1 == source.compute().nc1


# --------------------------------------------------------------------------------------------
# GPU: the tiled paths are torch ops and run on CUDA unchanged
# --------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_tiled_compute_matches_cpu(dtype):
    features, target, weight, bias = _problem(3000, 64, 9000, dtype=dtype)
    cpu = _stream(features, target, 3000).compute(weight, bias, pairwise_dtype=torch.float64)
    stats = NCStats(3000, 64, device="cuda")
    for start in range(0, 9000, 2048):
        stats.update(features[start:start + 2048].cuda(), target[start:start + 2048].cuda())
    second = stats.second_pass(weight.cuda(), bias.cuda()).update(features.cuda(), target.cuda())
    gpu = stats.compute(weight.cuda(), bias.cuda(), pairwise_dtype=torch.float64, second_pass=second)
    _assert_metrics(gpu, vars(cpu), FIRST_PASS + CLASSIFIER, 1e-9 if dtype == torch.float64 else 1e-5)
    assert gpu.ncc_mismatch is not None


# --------------------------------------------------------------------------------------------
# ncfast metrics: malformed inputs are one line and exit 2; fp16 streamed; observed classes
# --------------------------------------------------------------------------------------------
def _metrics_cli(capsys, *args):
    from ncfast.cli import main

    code = main(["metrics", *map(str, args), "--quiet"])
    return code, capsys.readouterr()


def _malformed(tmp_path):
    features, target, _, _ = _problem(3, 4, 30)
    good_f, good_y = tmp_path / "f.npy", tmp_path / "y.npy"
    np.save(good_f, features.numpy())
    np.save(good_y, target.numpy())
    empty = tmp_path / "empty.npy"
    empty.write_bytes(b"")
    archive = tmp_path / "archive.npz"
    np.savez(archive, features=features.numpy())
    no_columns = tmp_path / "d0.npy"
    np.save(no_columns, np.zeros((30, 0), dtype=np.float32))
    huge_u64 = tmp_path / "u64.npy"
    labels = target.numpy().astype(np.uint64)
    labels[5] = np.iinfo(np.uint64).max
    np.save(huge_u64, labels)
    big = tmp_path / "big.npy"
    labels = target.numpy().copy()
    labels[7] = 2**40
    np.save(big, labels)
    same_means = tmp_path / "same.npy"
    np.save(same_means, np.repeat(np.eye(3, 4, dtype=np.float32)[[0, 0, 1]], 10, axis=0))
    return {
        "empty": ([empty, good_y], "features: .*empty"),
        "npz": ([archive, good_y], "features: .*npz archive"),
        "d0": ([no_columns, good_y], r"features: .*no columns \(d = 0\)"),
        "uint64-max": ([good_f, huge_u64], "labels: the largest label, 18446744073709551615, makes K = "),
        "uint64-max-with-K": ([good_f, huge_u64, "--num-classes", 3], r"labels: values span \[0, 18446744073709551615\]"),
        "label-2^40": ([good_f, big], "labels: the largest label, 1099511627776, .* GiB"),
        "non-finite-metric": ([same_means, good_y.with_name("y3.npy")], "cdnv: came out (inf|nan)"),
    }, np.repeat(np.arange(3), 10)


@pytest.mark.parametrize("case", ["empty", "npz", "d0", "uint64-max", "uint64-max-with-K", "label-2^40",
                                  "non-finite-metric"])
def test_metrics_cli_malformed_input_is_one_line_exit_2(tmp_path, capsys, case):
    cases, three = _malformed(tmp_path)
    np.save(tmp_path / "y3.npy", three)
    args, message = cases[case]
    code, out = _metrics_cli(capsys, *args, "--pairwise-dtype", "float64")
    assert code == 2, out
    assert out.out == ""
    assert len(out.err.strip().splitlines()) == 1, out.err
    assert re.search(message, out.err), out.err


def test_metrics_cli_streams_fp16_and_observed_classes(tmp_path, capsys):
    features, target, weight, bias = _problem(5, 6, 200)
    target[target == 3] = 4  # class 3 never occurs
    half = features.to(torch.float16)
    for name, value in (("f", half.numpy()), ("y", target.numpy()), ("w", weight.numpy()), ("b", bias.numpy())):
        np.save(tmp_path / f"{name}.npy", value)
    paths = [tmp_path / f"{name}.npy" for name in ("f", "y")]
    code, out = _metrics_cli(capsys, *paths, "--weight", tmp_path / "w.npy", "--bias", tmp_path / "b.npy")
    assert code == 2 and "classes='observed'" in out.err
    code, out = _metrics_cli(capsys, *paths, "--weight", tmp_path / "w.npy", "--bias", tmp_path / "b.npy",
                             "--classes", "observed", "--json", "--batch-size", "64")
    assert code == 0, out.err
    got = json.loads(out.out)
    stats = _stream(half, target, 5, batch=64)  # the same fp16 batches through the API
    second = stats.second_pass(weight, bias, classes="observed").update(half, target)
    want = stats.compute(weight, bias, classes="observed", second_pass=second)
    assert got["classes_used"] == 4
    for name in FIRST_PASS + CLASSIFIER + ("ncc_mismatch",):
        assert got[name] == pytest.approx(getattr(want, name), rel=1e-12), name


def test_computes_in_several_threads_restore_the_thread_count():
    # compute runs small problems single-threaded; overlapping computes in several threads
    # must give the process its thread count back
    features, target, weight, _ = _problem(6, 8, 120)
    stats = [_stream(features, target, 6) for _ in range(4)]
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        workers = [threading.Thread(target=lambda s=s: [s.compute(weight) for _ in range(30)]) for s in stats]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("num_classes", [2, 5, 40])
def test_equiangularity_of_a_simplex_etf_is_zero(num_classes):
    # Every pairwise cosine of a simplex ETF is −1/(K−1): the std is 0 up to rounding of the
    # cosines themselves (a variance formed as Σc² − (Σc)²/P would leave ~1e-8).
    means = ncfast.simplex_etf(num_classes, num_classes + 3).double()
    target = torch.arange(num_classes).repeat(2)
    stats = NCStats(num_classes, num_classes + 3).update(means.repeat(2, 1), target)
    metrics = stats.compute(means, classes="all", pairwise_dtype=torch.float64)
    assert metrics.equiangularity_means < 1e-14
    assert metrics.equiangularity_classifier < 1e-14
