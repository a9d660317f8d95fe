"""The neural-collapse metrics that need the finished class means, streamed over the data a
second time (:class:`NCSecondPass`), tiled over classes so that no batch×K float64 product is
formed beyond one tile."""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import Tensor

from .ncstats_checks import (
    check_batch, check_classifier, check_count, check_global_mean, check_target_range, observed_index,
)
from .ncstats_metrics import global_mean_of

DEFAULT_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
#: elements of one batch×classes float64 tile (16 MiB)
TILE_ELEMENTS = 1 << 21
#: the per-class d×d Grams of the numerical rank are refused beyond this many bytes by default
NUMERICAL_RANK_MAX_BYTES = 8 << 30


class NCSecondPass:
    """The metrics that need the finished class means, streamed over the data a second time.

    * NCC mismatch (Papyan, Han and Donoho 2020): fraction of samples whose classifier
      decision argmax_k (Wh + b)_k differs from the nearest class mean argmin_k ‖h − μ_k‖
      (needs W);
    * cosine margin (Zhou et al. 2022 §4): cos θ_y − max_{j≠y} cos θ_j with θ_j the angle
      between h − μ_G and w_j − w̄ (needs W). Kept as a histogram of ``bins`` equal bins on
      [−2, 2] plus the exact min and max, not N values; quantiles are read off the histogram
      (:meth:`quantiles`, error ≤ one bin width, 4/bins);
    * numerical rank (Zhou et al. 2022 §4) (1/K) Σ_k (‖H_k‖_*/‖H_k‖_F)² of the raw class
      feature matrices, only with ``numerical_rank=True``: it keeps a d×d Gram per class
      (K·d² floats), accumulated around the known class means so it stays exact in the
      collapsed regime; refused with ValueError (and the memory it would take) beyond
      ``max_rank_bytes``.

    Each batch is compared with the classes a tile of ≤ 2²¹/N classes at a time (running
    argmax / argmin / max across tiles, the first index winning ties as in torch.argmax).

    Args:
        stats: the finished :class:`ncfast.NCStats` (its means and μ_G are copied now).
        weight, bias: classifier (K, d) and (K,) (bias zero when omitted).
        global_mean: which μ_G the cosine margins centre on (see :meth:`NCStats.compute`).
        bins: histogram bins for the cosine margins.
        numerical_rank: also accumulate the per-class Grams.
        classes: "all" or "observed", as in :meth:`NCStats.compute`.
        max_rank_bytes: the memory the per-class Grams may take.

    State is counts and histograms: :meth:`merge` and :meth:`all_reduce` combine exactly.
    Calls on one object from several threads are serialised by its lock.
    """

    def __init__(self, stats, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                 global_mean: str = "samples", bins: int = 4000, numerical_rank: bool = False, classes: str = "all",
                 max_rank_bytes: int = NUMERICAL_RANK_MAX_BYTES):
        from .ncstats import NCStats

        if not isinstance(stats, NCStats):
            raise TypeError(f"stats: expected NCStats, got {type(stats).__name__}")
        self.num_classes, self.dim, self.device = stats.num_classes, stats.dim, stats.device
        self.bins = check_count("bins", bins, 1)
        weight, bias = check_classifier(weight, bias, self.num_classes, self.dim, self.device)
        with stats._lock:
            index = observed_index(stats.counts, classes, "second_pass")
            self.means = stats.means.clone() if index is None else stats.means[index]
            self.counts = stats.counts.clone() if index is None else stats.counts[index]
            self.mu_g = global_mean_of(stats.counts, stats.means, check_global_mean(global_mean), index)
        K = self.counts.shape[0]
        # class k -> its row among the classes used (all of them, or the observed ones)
        self._row_of = None if index is None else torch.full((self.num_classes,), -1, dtype=torch.int64,
                                                             device=self.device).index_copy_(
            0, index, torch.arange(K, device=self.device))
        self.weight = self.bias = None
        if weight is not None:
            self.weight = weight if index is None else weight[index]
            self.bias = torch.zeros(K, dtype=torch.float64, device=self.device) if bias is None else (
                bias if index is None else bias[index])
            self._weight_mean = self.weight.sum(0, dtype=torch.float64) / K
            self._centred_norms = torch.cat([
                torch.linalg.vector_norm(self.weight[i:i + 8192].to(torch.float64) - self._weight_mean, dim=1)
                for i in range(0, K, 8192)])
            self._mean_sq = (self.means * self.means).sum(1)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.samples = torch.zeros((), **i64)
        self.mismatches = torch.zeros((), **i64)
        self.histogram = torch.zeros(self.bins, **i64)
        inf = float("inf")
        self.margin_min = torch.full((), inf, dtype=torch.float64, device=self.device)
        self.margin_max = torch.full((), -inf, dtype=torch.float64, device=self.device)
        self.class_grams = None
        if numerical_rank:
            need = K * self.dim * self.dim * 8
            if need > max_rank_bytes:
                raise ValueError(f"numerical_rank: needs a d×d float64 Gram per class, {K}·{self.dim}²·8 bytes = "
                                 f"{need / 2**30:.1f} GiB, above max_rank_bytes = {max_rank_bytes / 2**30:.1f} GiB; "
                                 f"raise max_rank_bytes if the memory is there, or measure it on a subset of classes")
            self.class_grams = torch.zeros(K, self.dim, self.dim, dtype=torch.float64, device=self.device)
        self._lock = threading.RLock()

    def _rows(self, target: Tensor) -> Tensor:
        """The rows of the classes used for ``target`` (ValueError for an unobserved class)."""
        if self._row_of is None:
            return target
        rows = self._row_of[target]
        if bool((rows < 0).any()):
            k = int(target[rows < 0][0])
            raise ValueError(f"target: class {k} had no samples in the statistics; feed the second pass the same data")
        return rows

    def _unit_weight(self, start: int, stop: int) -> Tensor:
        """(w_j − w̄)/‖w_j − w̄‖ for the classes [start, stop), float64."""
        rows = self.weight[start:stop].to(torch.float64) - self._weight_mean
        return rows / self._centred_norms[start:stop, None]

    def _classifier_update(self, h: Tensor, rows: Tensor) -> None:
        B, K = h.shape[0], self.counts.shape[0]
        neg_inf = float("-inf")
        best_logit = torch.full((B,), neg_inf, dtype=torch.float64, device=self.device)
        decision = torch.zeros(B, dtype=torch.int64, device=self.device)
        best_distance = torch.full((B,), float("inf"), dtype=torch.float64, device=self.device)
        nearest = torch.zeros(B, dtype=torch.int64, device=self.device)
        hc = h - self.mu_g
        hc_norm = torch.linalg.vector_norm(hc, dim=1)
        other_cos = torch.full((B,), neg_inf, dtype=torch.float64, device=self.device)
        true_cos = None
        samples = torch.arange(B, device=self.device)
        tile = max(1, TILE_ELEMENTS // B)
        for start in range(0, K, tile):
            stop = min(start + tile, K)
            logits = h @ self.weight[start:stop].to(torch.float64).T + self.bias[start:stop]
            value, arg = logits.max(1)
            better = value > best_logit
            best_logit, decision = torch.where(better, value, best_logit), torch.where(better, arg + start, decision)
            # argmin_k ‖h − μ_k‖² = argmin_k (‖μ_k‖² − 2 h·μ_k)
            distance = self._mean_sq[start:stop] - 2 * h @ self.means[start:stop].T
            value, arg = distance.min(1)
            better = value < best_distance
            best_distance, nearest = torch.where(better, value, best_distance), torch.where(better, arg + start, nearest)
            cos = (hc @ self._unit_weight(start, stop).T) / hc_norm[:, None]
            own = (rows >= start) & (rows < stop)
            if bool(own.any()):
                picked = torch.where(own, rows - start, 0)
                own_cos = cos[samples, picked]
                true_cos = torch.where(own, own_cos, true_cos if true_cos is not None else own_cos)
                cos[samples[own], picked[own]] = neg_inf
            other_cos = torch.maximum(other_cos, cos.max(1).values)
        self.mismatches += (decision != nearest).sum()
        margin = true_cos - other_cos
        self.margin_min = torch.minimum(self.margin_min, margin.min())
        self.margin_max = torch.maximum(self.margin_max, margin.max())
        index = ((margin + 2) * (self.bins / 4)).floor().clamp(0, self.bins - 1).to(torch.int64)
        self.histogram += torch.bincount(index, minlength=self.bins)

    @torch.no_grad()
    def update(self, features: Tensor, target: Tensor) -> "NCSecondPass":
        """Stream a batch (same arguments as :meth:`ncfast.NCStats.update`)."""
        features, target = check_batch(features, target, self.dim, self.device)
        check_target_range(target, self.num_classes)
        if features.shape[0] == 0:
            return self
        h = features.to(torch.float64)
        if not bool(torch.isfinite(h).all()):
            raise ValueError("features: contains NaN or infinite values")
        rows = self._rows(target)
        with self._lock:
            self.samples += h.shape[0]
            if self.weight is not None:
                self._classifier_update(h, rows)
            if self.class_grams is not None:
                centred = h - self.means[rows]
                for k in rows.unique().tolist():
                    rows_k = centred[rows == k]
                    self.class_grams[k].addmm_(rows_k.T, rows_k)
        return self

    def merge(self, other: "NCSecondPass") -> "NCSecondPass":
        """Fold in another second pass over other data (same statistics and classifier)."""
        if not isinstance(other, NCSecondPass):
            raise TypeError(f"other: expected NCSecondPass, got {type(other).__name__}")
        if other.bins != self.bins or (other.class_grams is None) != (self.class_grams is None):
            raise ValueError("other: was created with different bins or numerical_rank")
        with other._lock:
            parts = [t.to(self.device, copy=True) for t in (other.samples, other.mismatches, other.histogram,
                                                            other.margin_min, other.margin_max)]
            grams = None if other.class_grams is None else other.class_grams.to(self.device, copy=True)
        with self._lock:
            self.samples += parts[0]
            self.mismatches += parts[1]
            self.histogram += parts[2]
            self.margin_min = torch.minimum(self.margin_min, parts[3])
            self.margin_max = torch.maximum(self.margin_max, parts[4])
            if grams is not None:
                self.class_grams += grams
        return self

    def all_reduce(self, group=None) -> "NCSecondPass":
        """Sum the second-pass state over all ranks of ``group`` (integer sums and min/max are
        exact, so every rank ends identical)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce: torch.distributed is not initialised (call init_process_group first)")
        with self._lock:
            for tensor in (self.samples, self.mismatches, self.histogram):
                dist.all_reduce(tensor, group=group)
            dist.all_reduce(self.margin_min, op=dist.ReduceOp.MIN, group=group)
            dist.all_reduce(self.margin_max, op=dist.ReduceOp.MAX, group=group)
            if self.class_grams is not None:
                gathered = [torch.empty_like(self.class_grams) for _ in range(dist.get_world_size(group))]
                dist.all_gather(gathered, self.class_grams, group=group)
                self.class_grams = torch.stack(gathered).sum(0)  # summed in rank order on every rank
        return self

    def quantiles(self, qs=DEFAULT_QUANTILES) -> dict:
        """Cosine-margin quantiles {q: value}: the inverse CDF (the smallest margin with at least
        q·N margins at or below it), located inside its histogram bin by linear interpolation,
        so within one bin width (4/bins) of the exact value; exact at q = 0 and 1."""
        total = int(self.samples)
        counts = self.histogram.to(torch.float64).cpu()
        cumulative = torch.cumsum(counts, 0)
        width = 4.0 / self.bins
        lo, hi = float(self.margin_min), float(self.margin_max)
        out = {}
        for q in qs:
            rank = q * total
            i = int(torch.searchsorted(cumulative, torch.tensor(rank, dtype=torch.float64)).clamp(max=self.bins - 1))
            before = float(cumulative[i - 1]) if i > 0 else 0.0
            inside = float(counts[i])
            fraction = (rank - before) / inside if inside > 0 else 0.0
            out[q] = min(max(-2.0 + width * (i + fraction), lo), hi)
        return out

    def result(self) -> dict:
        """The second-pass fields of :class:`ncfast.NCMetrics`."""
        with self._lock:
            if int(self.samples) != int(self.counts.sum()):
                raise ValueError(f"second_pass: saw {int(self.samples)} samples, the statistics "
                                 f"{int(self.counts.sum())}; feed it the same data")
            out = {}
            if self.weight is not None:
                out["ncc_mismatch"] = float(self.mismatches) / float(self.samples)
                out["cosine_margin_quantiles"] = self.quantiles()
                edges = torch.linspace(-2.0, 2.0, self.bins + 1, dtype=torch.float64)
                out["cosine_margin_histogram"] = {"edges": edges.tolist(), "counts": self.histogram.cpu().tolist()}
            if self.class_grams is not None:
                # Raw Gram H_kᵀH_k = centred scatter + n_k μ_k μ_kᵀ; ‖H_k‖_* = Σ √eig, ‖H_k‖_F² = trace.
                raw = self.class_grams + self.counts[:, None, None] * self.means[:, :, None] * self.means[:, None, :]
                eig = torch.linalg.eigvalsh(raw).clamp(min=0)
                ratio = eig.sqrt().sum(1).square() / eig.sum(1)
                out["numerical_rank"] = float(ratio.mean())
            return out
