"""Concurrency: the kernels release the GIL, so two Python threads may run the same
op at once; each must get exactly (bitwise) what a serial call gives. The thread count —
``torch.set_num_threads`` or ``OMP_NUM_THREADS`` at start-up — must not change any bit either
(no float atomics; every reduction splits its work independently of the thread count).

No timing is asserted: the GIL release is exercised (the threads overlap inside the kernels),
not measured."""

import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import ncfast

# the serial-vs-threaded checks run the CPU backends; the Triton interpreter is not thread-safe
BACKENDS = [b for b in ("cpp", "torch") if b in ncfast.available_backends()]
LOSSES = {
    "cross_entropy": lambda x, y: ncfast.cross_entropy(x, y, label_smoothing=0.1),
    "focal": lambda x, y: ncfast.focal_loss(x, y, gamma=2.0),
    "rescaled_mse": lambda x, y: ncfast.rescaled_mse(x, y, kappa=2.0, beta=3.0),
    "linear_cross_entropy": None,  # features (N, d) @ a fixed (K, d) classifier, below
}
REPEATS = 4


def _problem(seed, n=96, k=1500, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, k, generator=g) * 3).to(dtype)
    target = torch.randint(0, k, (n,), generator=g)
    target[::7] = -100
    return logits, target


def _loss_and_grad(loss, logits, target, backend):
    """The loss and the gradient of every input, cloned out of any reused workspace."""
    with ncfast.use_backend(backend):
        if loss == "linear_cross_entropy":
            d = 24
            g = torch.Generator().manual_seed(int(target.sum()))
            features = torch.randn(logits.shape[0], d, generator=g).requires_grad_(True)
            weight = (torch.randn(logits.shape[1], d, generator=g) / d**0.5).requires_grad_(True)
            value = ncfast.linear_cross_entropy(features, weight, None, target, chunk_memory=1 << 16)
            grads = torch.autograd.grad(value, [features, weight])
        else:
            x = logits.clone().requires_grad_(True)
            value = LOSSES[loss](x, target)
            grads = torch.autograd.grad(value, [x])
    return [value.detach().clone()] + [grad.clone() for grad in grads]


def _run_in_threads(jobs):
    """Runs each job in its own thread, all released together; returns their results."""
    barrier = threading.Barrier(len(jobs))
    results, errors = [None] * len(jobs), []

    def work(i, job):
        try:
            barrier.wait()
            results[i] = [job() for _ in range(REPEATS)]
        except BaseException as error:  # surfaced in the main thread below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _assert_bitwise(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype and a.shape == e.shape
        assert torch.equal(a, e) or (a.isnan() == e.isnan()).all() and torch.equal(a.nan_to_num(), e.nan_to_num())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_two_threads_match_serial(loss, backend):
    problems = [_problem(1), _problem(2)]
    serial = [_loss_and_grad(loss, *problem, backend) for problem in problems]
    threaded = _run_in_threads([lambda p=problem: _loss_and_grad(loss, *p, backend) for problem in problems])
    for results, expected in zip(threaded, serial):
        for result in results:
            _assert_bitwise(result, expected)


def _same_shape_jobs(loss, backend):
    """Both threads on the same shape: they compete for the reused CPU gradient workspace."""
    problems = [_problem(3, n=64, k=700), _problem(4, n=64, k=700)]
    return problems, [lambda p=problem: _loss_and_grad(loss, *p, backend) for problem in problems]


@pytest.mark.parametrize("loss", ["cross_entropy", "focal"])
def test_threads_do_not_share_the_gradient_workspace(loss):
    backend = BACKENDS[0]
    problems, jobs = _same_shape_jobs(loss, backend)
    serial = [_loss_and_grad(loss, *problem, backend) for problem in problems]
    for results, expected in zip(_run_in_threads(jobs), serial):
        for result in results:
            _assert_bitwise(result, expected)


def _ncstats_batches(seed, k=7, d=33, batches=5, rows=80):
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(k, d, generator=g) * 4
    out = []
    for _ in range(batches):
        target = torch.randint(0, k, (rows,), generator=g)
        target[:k] = torch.arange(k)
        out.append((means[target] + torch.randn(rows, d, generator=g), target))
    return out


def _ncstats_state(batches, backend):
    k, d = 7, batches[0][0].shape[1]
    with ncfast.use_backend(backend):
        stats = ncfast.NCStats(k, d)
        for features, target in batches:
            stats.update(features, target)
        metrics = stats.compute(torch.randn(k, d, generator=torch.Generator().manual_seed(0)))
    state = [stats.counts.clone(), stats.means.clone(), stats.within_scatter.clone(), stats.class_sq.clone()]
    return state + [torch.tensor([metrics.nc1, metrics.nc2, metrics.nc3, metrics.cdnv], dtype=torch.float64)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ncstats_update_in_two_threads_matches_serial(backend):
    data = [_ncstats_batches(10), _ncstats_batches(11)]
    serial = [_ncstats_state(batches, backend) for batches in data]
    threaded = _run_in_threads([lambda b=batches: _ncstats_state(b, backend) for batches in data])
    for results, expected in zip(threaded, serial):
        for result in results:
            _assert_bitwise(result, expected)


# --------------------------------------------------------------------------------------------
# thread counts
# --------------------------------------------------------------------------------------------
def _everything(backend):
    """(Loss values and gradients of the losses and a set of NCStats, as one flat list;
    linear + loss's value and gradients.) The second is apart because its gradients come from
    torch.mm, and MKL's sgemm splits its sums differently for 1 and 2 threads (a few ulp)."""
    out = []
    logits, target = _problem(5, n=300, k=2000)
    for loss in sorted(LOSSES):
        if loss != "linear_cross_entropy":
            out += _loss_and_grad(loss, logits, target, backend)
    out += _ncstats_state(_ncstats_batches(12, batches=3, rows=400), backend)
    return out, _loss_and_grad("linear_cross_entropy", logits, target, backend)


def _assert_same_runs(run, expected):
    _assert_bitwise(run[0], expected[0])
    for a, e in zip(run[1], expected[1]):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-7)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_thread_count_does_not_change_results(backend, restore_threads):
    torch.set_num_threads(1)
    one = _everything(backend)
    torch.set_num_threads(2)
    two = _everything(backend)
    _assert_same_runs(two, one)


_CHILD = """
import json, sys, torch, ncfast
sys.path.insert(0, {tests!r})
from test_concurrency import _everything
out = _everything({backend!r})
torch.save(out, {path!r})
print(json.dumps(dict(threads=torch.get_num_threads())))
"""


def _child(backend, path, omp_threads):
    env = {key: value for key, value in os.environ.items() if key not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if omp_threads is not None:
        env["OMP_NUM_THREADS"] = str(omp_threads)
    code = _CHILD.format(tests=os.path.dirname(__file__), backend=backend, path=str(path))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])["threads"], torch.load(path)


def test_omp_num_threads_is_honoured(tmp_path):
    """A fresh process started with OMP_NUM_THREADS=1 runs one thread and gets the same bits as
    one started with torch's default (all cores)."""
    backend = BACKENDS[0]
    threads, results = _child(backend, tmp_path / "one.pt", 1)
    default_threads, default = _child(backend, tmp_path / "default.pt", None)
    assert threads == 1
    if os.cpu_count() > 1:
        assert default_threads > 1
    _assert_same_runs(results, default)
