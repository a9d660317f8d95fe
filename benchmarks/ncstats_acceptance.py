"""The vocabulary-scale acceptance run of :class:`ncfast.NCStats` (standalone, not asv).

Streams N synthetic fp32 features (K classes, width d) in batches, then calls ``compute()``
with a classifier W, b and every first-pass metric, and prints a table:

* update throughput against the bare fp32 Gram ``hᵀh`` of the same batches on both of torch's
  CPU GEMM libraries (``torch.mm`` = MKL, and oneDNN through ``ncfast._matmul.mm_t``; each
  batch timed all three ways, interleaved; the ratios are medians of the per-batch ratios, so a
  slow spell of a shared machine weighs on both sides);
* compute()'s time, split into its two pairwise sweeps (class means, classifier rows) and the
  rest, and its extra peak memory (resident set sampled every 5 ms) against the size of the
  state (the K×d float64 means dominate it);
* each sweep's rate against the bare fp32 GEMMs of the same tiles (upper triangle), on oneDNN
  and on MKL, measured in the same run, and the same ratios as medians of paired rounds (the
  sweep, then the bare GEMMs) over the first ``--paired-rows`` rows.

Defaults are the acceptance case: K=131072, d=1024, N=1_048_576 in batches of 8192.
``--samples`` and ``--classes`` shrink it (e.g. ``--classes 32768 --samples 262144``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import threading
import time

import torch

from ncfast import NCStats, ncstats_pairwise
from ncfast._matmul import mm_t
from ncfast.ncstats_metrics import global_mean_of

PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Peak resident set (bytes) above the level at entry, sampled every 5 ms."""

    def __enter__(self):
        self.base = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())
        self.extra = self.peak - self.base


def _batches(means: torch.Tensor, samples: int, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    K, d = means.shape
    for start in range(0, samples, batch):
        rows = min(batch, samples - start)
        target = torch.randint(0, K, (rows,), generator=g)
        yield means[target] + 0.1 * torch.randn(rows, d, generator=g), target


def _tiles(K: int, tile: int):
    """The (rows, cols) slices of the pairwise sweep's tiles: upper triangle, diagonal included."""
    for i in range(0, K, tile):
        for j in range(i, K, tile):
            yield slice(i, i + tile), slice(j, j + tile)


def _bare_gemm_seconds(unit: torch.Tensor, tile: int, library: str) -> float:
    """The fp32 GEMMs of the pairwise sweep alone (same tiles), on "onednn" (a fresh output per
    tile, as the sweep) or "mkl" (``torch.mm`` into one reused buffer: its best case)."""
    buffer = torch.empty(min(tile, unit.shape[0]) ** 2, dtype=unit.dtype)
    start = time.perf_counter()
    for r, c in _tiles(unit.shape[0], tile):
        rows, cols = unit[r], unit[c]
        if library == "onednn":
            mm_t(rows, cols)
        else:
            torch.mm(rows, cols.T, out=buffer[:rows.shape[0] * cols.shape[0]].view(rows.shape[0], cols.shape[0]))
    return time.perf_counter() - start


def _tile_flops(K: int, d: int, tile: int) -> int:
    return sum(2 * len(range(K)[r]) * len(range(K)[c]) * d for r, c in _tiles(K, tile))


@contextlib.contextmanager
def _timed_sweeps():
    """Records the seconds of each pairwise sweep compute() runs (means first, then the
    classifier rows) by wrapping ``ncstats_pairwise.pairwise_sums`` for the block."""
    seconds = []
    original = ncstats_pairwise.pairwise_sums

    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = original(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return result

    ncstats_pairwise.pairwise_sums = timed
    try:
        yield seconds
    finally:
        ncstats_pairwise.pairwise_sums = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=131072)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=1_048_576)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--paired-rows", type=int, default=8192, help="rows of the paired sweep-vs-GEMM rounds")
    parser.add_argument("--rounds", type=int, default=7, help="paired sweep-vs-GEMM rounds")
    parser.add_argument("--update-only", action="store_true", help="stop after the update measurement")
    args = parser.parse_args()
    K, d = args.classes, args.dim
    g = torch.Generator().manual_seed(0)
    means = torch.randn(K, d, generator=g)
    weight = means + 0.1 * torch.randn(K, d, generator=g)
    bias = 0.1 * torch.randn(K, generator=g)

    stats = NCStats(K, d)
    update_s = mkl_s = onednn_s = 0.0
    mkl_ratios, onednn_ratios = [], []
    for features, target in _batches(means, args.samples, args.batch, seed=1):
        start = time.perf_counter()
        features.T @ features
        mkl = time.perf_counter() - start
        start = time.perf_counter()
        mm_t(features.T, features.T)
        onednn = time.perf_counter() - start
        start = time.perf_counter()
        stats.update(features, target)
        update = time.perf_counter() - start
        update_s, mkl_s, onednn_s = update_s + update, mkl_s + mkl, onednn_s + onednn
        mkl_ratios.append(mkl / update)
        onednn_ratios.append(onednn / update)
    state_bytes = sum(t.numel() * t.element_size() for t in (stats.counts, stats.means, stats.within_scatter,
                                                            stats.class_sq))
    observed = int((stats.counts > 0).sum())
    classes = "all" if observed == K else "observed"
    rows = [
        ("classes K / observed", f"{K} / {observed}"),
        ("dim d", str(d)),
        ("samples N (batches of)", f"{args.samples} ({args.batch})"),
        ("threads", str(torch.get_num_threads())),
        ("update total (s)", f"{update_s:.2f}"),
        ("bare fp32 Gram loop, MKL / oneDNN (s)", f"{mkl_s:.2f} / {onednn_s:.2f}"),
        ("update / Gram throughput (median), MKL", f"{statistics.median(mkl_ratios):.2f}  (target >= 0.5)"),
        ("update / Gram throughput (median), oneDNN", f"{statistics.median(onednn_ratios):.2f}"),
    ]
    _print(rows)
    if args.update_only:
        return

    with PeakMemory() as memory, _timed_sweeps() as sweeps:
        start = time.perf_counter()
        metrics = stats.compute(weight, bias, classes=classes, pairwise_dtype=torch.float32)
        compute_s = time.perf_counter() - start
    means_sweep_s, classifier_sweep_s = sweeps
    rows = [
        ("compute() with W, b (s)", f"{compute_s:.1f}  (target <= 120 at the full size)"),
        ("  sweep of the means / of W (s)", f"{means_sweep_s:.1f} / {classifier_sweep_s:.1f}"),
        ("  the rest of compute() (s)", f"{compute_s - means_sweep_s - classifier_sweep_s:.1f}"),
        ("state size (MiB)", f"{state_bytes / 2**20:.0f}"),
        ("compute() extra peak (MiB)", f"{memory.extra / 2**20:.0f}  ({memory.extra / state_bytes:.2f}x state, "
                                       f"target <= 1.5x)"),
        ("nc1 / cdnv / nc2", f"{metrics.nc1:.4g} / {metrics.cdnv:.4g} / {metrics.nc2:.4g}"),
    ]
    _print(rows)

    # The bare GEMMs of the same tiles (the means' unit rows; W's sweep has the same shapes).
    index = None if classes == "all" else (stats.counts > 0).nonzero().flatten()
    mu_g = global_mean_of(stats.counts, stats.means, "samples")
    summary = ncstats_pairwise.summarize_rows(stats.means, mu_g, torch.float32, index)
    unit = summary.unit
    tile = ncstats_pairwise.TILE_ROWS
    gflop = _tile_flops(unit.shape[0], d, tile) / 1e9
    onednn_s = _bare_gemm_seconds(unit, tile, "onednn")
    mkl_s = _bare_gemm_seconds(unit, tile, "mkl")
    rows = [
        ("tiles (rows) / GFLOP per sweep", f"{tile} / {gflop:.0f}"),
        ("bare fp32 GEMMs of the tiles, oneDNN (s)", f"{onednn_s:.1f}  ({gflop / onednn_s:.0f} GFLOP/s)"),
        ("bare fp32 GEMMs of the tiles, MKL (s)", f"{mkl_s:.1f}  ({gflop / mkl_s:.0f} GFLOP/s)"),
        ("sweep of the means: rate", f"{gflop / means_sweep_s:.0f} GFLOP/s = {onednn_s / means_sweep_s:.2f}x oneDNN, "
                                     f"{mkl_s / means_sweep_s:.2f}x MKL  (target >= 0.5)"),
        ("sweep of W: rate", f"{gflop / classifier_sweep_s:.0f} GFLOP/s = {onednn_s / classifier_sweep_s:.2f}x oneDNN, "
                             f"{mkl_s / classifier_sweep_s:.2f}x MKL"),
    ]
    _print(rows)

    # The same ratios from paired rounds on the first rows (each round: the sweep, then the
    # bare GEMMs of its tiles on both libraries), robust to a shared machine's slow spells.
    rows_used = min(unit.shape[0], args.paired_rows)
    counts = stats.counts if index is None else stats.counts[index]
    class_sq = stats.class_sq if index is None else stats.class_sq[index]
    variances = (class_sq / counts)[:rows_used]
    onednn_ratios, mkl_ratios = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        ncstats_pairwise.pairwise_sums(unit[:rows_used], summary.norms[:rows_used], variances)
        sweep = time.perf_counter() - start
        onednn_ratios.append(_bare_gemm_seconds(unit[:rows_used], tile, "onednn") / sweep)
        mkl_ratios.append(_bare_gemm_seconds(unit[:rows_used], tile, "mkl") / sweep)
    _print([(f"paired rounds ({args.rounds}, first {rows_used} rows): sweep rate",
             f"{statistics.median(onednn_ratios):.2f}x oneDNN, {statistics.median(mkl_ratios):.2f}x MKL (medians)")])


def _print(rows) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", flush=True)


if __name__ == "__main__":
    main()
