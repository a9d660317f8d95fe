"""The vocabulary-scale acceptance run of :class:`ncfast.NCStats` (standalone, not asv).

Streams N synthetic fp32 features (K classes, width d) in batches, then calls ``compute()``
with a classifier W, b and every first-pass metric, and prints a table:

* update throughput against the bare fp32 Gram ``hᵀh`` of the same batches (each batch timed
  both ways, interleaved; the ratio is the median of the per-batch ratios, so a slow spell of
  a shared machine weighs on both sides);
* compute()'s time and extra peak memory (resident set sampled every 5 ms) against the size
  of the state (the K×d float64 means dominate it);
* the pairwise part (max-angle and CDNV of the means: T×T tiles, upper triangle) against the
  bare fp32 GEMMs of the same tiles, measured in the same run.

Defaults are the acceptance case: K=131072, d=1024, N=1_048_576 in batches of 8192.
``--samples`` and ``--classes`` shrink it (e.g. ``--classes 32768 --samples 262144``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time

import torch

from ncfast import NCStats, ncstats_pairwise
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


def _bare_gemm_seconds(unit: torch.Tensor, tile: int) -> float:
    """The fp32 GEMMs of the pairwise sweep alone (same tiles, upper triangle)."""
    K = unit.shape[0]
    buffer = torch.empty(min(tile, K) ** 2, dtype=unit.dtype)
    start = time.perf_counter()
    for i in range(0, K, tile):
        rows = unit[i:i + tile]
        for j in range(i, K, tile):
            cols = unit[j:j + tile]
            torch.mm(rows, cols.T, out=buffer[:rows.shape[0] * cols.shape[0]].view(rows.shape[0], cols.shape[0]))
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=131072)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=1_048_576)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--update-only", action="store_true", help="stop after the update measurement")
    args = parser.parse_args()
    K, d = args.classes, args.dim
    g = torch.Generator().manual_seed(0)
    means = torch.randn(K, d, generator=g)
    weight = means + 0.1 * torch.randn(K, d, generator=g)
    bias = 0.1 * torch.randn(K, generator=g)

    stats = NCStats(K, d)
    update_s = gram_s = 0.0
    ratios = []
    for features, target in _batches(means, args.samples, args.batch, seed=1):
        start = time.perf_counter()
        features.T @ features
        gram = time.perf_counter() - start
        start = time.perf_counter()
        stats.update(features, target)
        update = time.perf_counter() - start
        update_s, gram_s = update_s + update, gram_s + gram
        ratios.append(gram / update)
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
        ("bare fp32 Gram loop (s)", f"{gram_s:.2f}"),
        ("update / Gram throughput (median)", f"{statistics.median(ratios):.2f}  (target >= 0.5)"),
    ]
    _print(rows)
    if args.update_only:
        return

    with PeakMemory() as memory:
        start = time.perf_counter()
        metrics = stats.compute(weight, bias, classes=classes, pairwise_dtype=torch.float32)
        compute_s = time.perf_counter() - start
    rows = [
        ("compute() with W, b (s)", f"{compute_s:.1f}  (target <= 120 at the full size)"),
        ("state size (MiB)", f"{state_bytes / 2**20:.0f}"),
        ("compute() extra peak (MiB)", f"{memory.extra / 2**20:.0f}  ({memory.extra / state_bytes:.2f}x state, "
                                       f"target <= 1.5x)"),
        ("nc1 / cdnv / nc2", f"{metrics.nc1:.4g} / {metrics.cdnv:.4g} / {metrics.nc2:.4g}"),
    ]
    _print(rows)

    # The pairwise part alone, and the bare GEMMs of its tiles, in the same run.
    index = None if classes == "all" else (stats.counts > 0).nonzero().flatten()
    counts = stats.counts if index is None else stats.counts[index]
    class_sq = stats.class_sq if index is None else stats.class_sq[index]
    mu_g = global_mean_of(stats.counts, stats.means, "samples")
    summary = ncstats_pairwise.summarize_rows(stats.means, mu_g, torch.float32, index)
    start = time.perf_counter()
    ncstats_pairwise.pairwise_sums(summary.unit, summary.norms, class_sq / counts)
    pairwise_s = time.perf_counter() - start
    gemm_s = _bare_gemm_seconds(summary.unit, ncstats_pairwise.TILE_ROWS)
    flops = counts.shape[0] ** 2 * d  # upper triangle (K²/2 tiles) × 2 flops per multiply-add

    rows = [
        ("pairwise sweep of the means (s)", f"{pairwise_s:.1f}"),
        ("bare fp32 GEMM of the same tiles (s)", f"{gemm_s:.1f}  ({flops / gemm_s / 1e9:.0f} GFLOP/s)"),
        ("pairwise / GEMM throughput", f"{gemm_s / pairwise_s:.2f}  (target >= 0.5)"),
    ]
    _print(rows)


def _print(rows) -> None:
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}", flush=True)


if __name__ == "__main__":
    main()
