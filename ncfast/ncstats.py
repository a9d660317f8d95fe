"""Streaming neural-collapse statistics: exact in the collapsed regime, one pass, mergeable
across processes, safe to share between threads, at vocabulary scale (K ~ 10⁵ classes).

:class:`NCStats` keeps, in float64, the per-class counts n_k, the class means μ_k and the
within-class scatter M_W = Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ, and folds each batch in with
Chan, Golub and LeVeque's pairwise update::

    M_W += M_W^batch + Σ_k (n_k^a n_k^b / (n_k^a + n_k^b)) (ν_k − μ_k)(ν_k − μ_k)ᵀ

where M_W^batch is the batch's scatter around its own class means ν_k. The raw-moment form
E[hhᵀ] − Σ n_k μ_k μ_kᵀ/N is never formed: when NC1 ≪ 1 its two terms cancel to the last digit.

Per batch: the labels are compacted to the classes the batch holds (its work is
O(classes in the batch · d), not O(K·d)), one kernel computes their counts and float64 means
and writes the rows centred on p_k = ν_k − √(n^a/(n^a+n^b))(ν_k − μ_k) — whose Gram is exactly
the batch scatter plus the correction above (derivation in ``csrc/ncstats.cpp``) — and one
Gram ``CᵀC`` (float32 for float32/bfloat16/float16 features, float64 for float64; oneDNN for
float32 on CPU, BLAS for float64, cuBLAS with TF32 off on CUDA) folds them in. The rows are
scaled by a power of two chosen from the batch's magnitude, exactly, so any finite input gives
the float64 answer of its values.

:meth:`NCStats.compute` derives the metrics in O(K·d + d²) memory (``ncstats_pairwise``);
:class:`NCSecondPass` (``ncstats_second``) streams the data again for the metrics that need the
finished means. :func:`nc_metrics` does both at once.

Features are rows: ``features`` (N, d), ``target`` (N,), classifier ``weight`` (K, d),
``bias`` (K,) — the papers store features as columns.
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Optional

import torch
from torch import Tensor

from . import _backend
from ._dtypes import accumulation_dtype, dtype_name
from ._matmul import mm_t
from .ncstats_checks import (
    check_batch, check_classifier, check_count, check_global_mean, check_target_range, ieee_fp32_matmul,
    observed_index, validated_state,
)
from .ncstats_metrics import NCMetrics, global_mean_of, state_metrics
from .ncstats_second import NCSecondPass


# --------------------------------------------------------------------------------------------
# batch backends. The C++ one folds the batch into the state itself (``csrc/ncstats.cpp``).
# The Triton and torch ones take (features (N, d), target (N,) compacted to [0, K'), the
# state counts (K',) and means (K', d) of those classes, ``centred`` (N, d) to fill, scale)
# and return the batch's counts (K',), means ν (K', d) and Σ_{i∈k}‖h_i − p_k‖² (K',) in
# float64, ``centred`` getting scale·(h_i − p_{y_i}); :meth:`NCStats._fold` does the rest.
# --------------------------------------------------------------------------------------------
def _centres(counts: Tensor, means: Tensor, state_counts: Tensor, state_means: Tensor) -> Tensor:
    """p_k = ν_k − t_k (ν_k − μ_k), t_k = √(n^a/(n^a + n^b)) (K', d)."""
    shrink = (state_counts / (state_counts + counts)).sqrt()
    return means - shrink[:, None] * (means - state_means)


def _triton_batch(features, target, state_counts, state_means, centred, scale):
    from .triton_kernels import ncstats as kernels

    counts, means = kernels.class_means(features, target, state_means.shape[0])
    _check_finite_means(means)
    centres = _centres(counts, means, state_counts, state_means)
    return counts, means, kernels.centre_rows(features, target, centres, centred, scale)


def _torch_batch(features, target, state_counts, state_means, centred, scale):
    K, d = state_means.shape
    x = features.to(torch.float64)
    counts = torch.bincount(target, minlength=K).to(torch.float64)
    means = torch.zeros(K, d, dtype=torch.float64, device=x.device).index_add_(0, target, x) / counts[:, None]
    _check_finite_means(means)
    rows = x - _centres(counts, means, state_counts, state_means)[target]
    centred.copy_(rows * scale)
    class_sq = torch.zeros(K, dtype=torch.float64, device=x.device).index_add_(0, target, (rows * rows).sum(1))
    return counts, means, class_sq


_BACKEND_BATCH = {"triton": _triton_batch, "torch": _torch_batch}


def _check_finite_means(means: Tensor) -> None:
    # A NaN or ±inf feature makes its class mean non-finite: K'·d values to check, not N·d.
    if not bool(torch.isfinite(means).all()):
        raise ValueError("features: contains NaN or infinite values")


def _power_of_two_exponent(features: Tensor, state_means: Tensor) -> int:
    """e such that |h|, |μ| ≤ 2^e over the batch and the running means of its classes, so
    every centred row is below 2^(e+1): the rows are written times 2^-e, exactly, and their
    float32 Gram (≤ 4N per entry) neither overflows nor underflows. e ≥ −1000 keeps 2^-e a
    finite float64 for float64 subnormal inputs."""
    largest = 0.0
    for tensor in (features, state_means):
        low, high = torch.aminmax(tensor)
        largest = max(largest, -float(low), float(high))
    return max(math.frexp(largest)[1], -1000) if largest > 0 else 0


_SCATTER_LIMIT = math.ldexp(1.0, 1000)
_OVERFLOW = ("features: their within-class scatter overflows float64 (values near 1e150 or beyond); "
             "rescale the features")


_SINGLE_THREAD_LOCK = threading.Lock()
_single_thread_users = 0
_saved_threads = 1


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device, small: bool):
    """Runs torch's CPU ops single-threaded inside the block when the work is ``small``
    (no-op otherwise and for other devices): multithreaded BLAS/LAPACK calls on small matrices
    were measured 100× slower (a QR of 512×100: 0.14 s instead of 0.8 ms) whenever another
    process keeps a core busy, while the O(K²·d) tiles of a large K need every core. The thread
    count is process-wide: the first block to enter saves it and the last to leave restores
    it, so overlapping blocks in several threads cannot leave the process single-threaded."""
    global _single_thread_users, _saved_threads
    if device.type != "cpu" or not small:
        yield
        return
    with _SINGLE_THREAD_LOCK:
        if _single_thread_users == 0:
            _saved_threads = torch.get_num_threads()
            torch.set_num_threads(1)
        _single_thread_users += 1
    try:
        yield
    finally:
        with _SINGLE_THREAD_LOCK:
            _single_thread_users -= 1
            if _single_thread_users == 0:
                torch.set_num_threads(_saved_threads)


# --------------------------------------------------------------------------------------------
# streaming statistics
# --------------------------------------------------------------------------------------------
class NCStats:
    """Streaming first-pass NC statistics in float64: memory O(K·d + d²), independent of N.

    Args:
        num_classes: K ≥ 2.
        dim: feature dimension d ≥ 1.
        device: where the state lives and where ``update``'s batches must be (default CPU).

    Attributes (float64): ``counts`` (K,), ``means`` (K, d), ``within_scatter`` (d, d) = M_W
    (a sum, not divided by N), ``class_sq`` (K,) = Σ_{i∈k} ‖h_i − μ_k‖² (for the CDNV).

    One object may be shared between threads: :meth:`update`, :meth:`merge`, :meth:`compute`,
    :meth:`state_dict`, :meth:`load_state_dict` and :meth:`all_reduce` hold its lock, so
    concurrent calls give the result of some serial order of them.
    """

    def __init__(self, num_classes: int, dim: int, device=None):
        self.num_classes = check_count("num_classes", num_classes, 2)
        self.dim = check_count("dim", dim, 1)
        self.device = torch.device("cpu" if device is None else device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(num_classes, **f64)
        self.means = torch.zeros(num_classes, dim, **f64)
        self.within_scatter = torch.zeros(dim, dim, **f64)
        self.class_sq = torch.zeros(num_classes, **f64)
        self._workspace: Optional[Tensor] = None  # centred-rows buffer, reused across batches
        self._means_scratch: Optional[Tensor] = None  # the C++ kernel's batch means
        self._lock = threading.RLock()

    def _centred_buffer(self, rows: int, dtype: torch.dtype) -> Tensor:
        """A (rows, d) view of a buffer reused across batches (a fresh 32 MB allocation per
        batch costs page faults)."""
        need = rows * self.dim
        if self._workspace is None or self._workspace.dtype != dtype or self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=dtype, device=self.device)
        return self._workspace[:need].view(rows, self.dim)

    @torch.no_grad()
    def update(self, features: Tensor, target: Tensor) -> "NCStats":
        """Fold in a batch: ``features`` (N, d) float32/float64/bfloat16/float16 on the stats'
        device, ``target`` (N,) integer classes in [0, K). Any N (0 and 1 included), any class
        mix, any finite magnitude. Raises ValueError (state unchanged) on bad shapes, targets,
        non-finite features or a scatter beyond float64's range.

        The work is O(N·d² + K'·d) for the K' classes present in the batch: their rows of the
        state are gathered, updated and written back. The scatter comes from one Gram of the
        centred rows in float32 (float64 for float64 features): float32 keeps ~7 digits of the
        *within-class* spread however large the means are."""
        features, target = check_batch(features, target, self.dim, self.device)
        if features.shape[0] == 0:
            return self
        check_target_range(target, self.num_classes)
        classes, local = torch.unique(target, sorted=True, return_inverse=True)
        backend = _backend.backend_for(features)
        with self._lock:
            centred = self._centred_buffer(features.shape[0], accumulation_dtype(features.dtype))
            if backend == "cpp":
                from . import _C

                means = self._scratch(classes.shape[0])
                exponent = _C.ncstats_update(
                    _backend.cpu_buffer(features), local.numpy(), dtype_name(features.dtype),
                    classes.numpy(), self.counts.numpy(), self.means.numpy(), self.class_sq.numpy(), means.numpy(),
                    centred.numpy(), torch.get_num_threads())
            else:
                exponent = self._fold(features, classes, local, centred, _BACKEND_BATCH[backend])
            with ieee_fp32_matmul(self.device):
                # CᵀC. oneDNN (float32 CPU) ran 1.4x MKL here at (8192, 1024); its scatter carries
                # ~8e-8 relative rounding against MKL's ~5e-8 (NC1 ~1.5e-8 against ~1e-9)
                gram = mm_t(centred.T, centred.T)
            # the scatter's trace is below 2^1000 (checked above), so none of this overflows
            if abs(exponent) < 500:
                self.within_scatter.add_(gram, alpha=math.ldexp(1.0, 2 * exponent))
            else:
                self.within_scatter.add_(torch.ldexp(gram.to(torch.float64), torch.tensor(2.0 * exponent)))
        return self

    def _scratch(self, rows: int) -> Tensor:
        """A (rows, d) float64 buffer reused across batches for the C++ kernel's batch means."""
        need = rows * self.dim
        if self._means_scratch is None or self._means_scratch.numel() < need:
            self._means_scratch = torch.empty(need, dtype=torch.float64)
        return self._means_scratch[:need].view(rows, self.dim)

    def _fold(self, features, classes, local, centred, batch) -> int:
        """The Triton / torch update of the batch's classes (gathered, updated, written back);
        returns e, ``centred`` holding 2^-e (h_i − p_{y_i})."""
        state_counts, state_means = self.counts[classes], self.means[classes]
        exponent = _power_of_two_exponent(features, state_means)
        counts, means, class_sq = batch(features, local, state_counts, state_means, centred, math.ldexp(1.0, -exponent))
        if not float(self.class_sq.sum()) + float(class_sq.sum()) < _SCATTER_LIMIT:
            raise ValueError(_OVERFLOW)
        total = state_counts + counts
        state_means.addcmul_(means - state_means, (counts / total)[:, None])
        self.counts.index_copy_(0, classes, total)
        self.means.index_copy_(0, classes, state_means)
        self.class_sq.index_add_(0, classes, class_sq)
        return exponent

    def _merge(self, counts: Tensor, means: Tensor, scatter: Tensor, class_sq: Tensor) -> None:
        """Chan's pairwise merge of another state (all K classes) into this one."""
        total = self.counts + counts
        delta = means - self.means
        pair = torch.where((self.counts > 0) & (counts > 0), self.counts * counts / total.clamp(min=1), 0.0)
        rows = pair.sqrt()[:, None] * delta
        self.within_scatter = self.within_scatter + scatter + rows.T @ rows
        self.class_sq = self.class_sq + class_sq + pair * (delta * delta).sum(1)
        self.means = self.means + delta * (counts / total.clamp(min=1))[:, None]
        self.counts = total

    @torch.no_grad()
    def merge(self, other: "NCStats") -> "NCStats":
        """Fold in another state (same K and d): the statistics of both data sets together."""
        if not isinstance(other, NCStats):
            raise TypeError(f"other: expected NCStats, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(f"other: has (K, d) = ({other.num_classes}, {other.dim}), "
                             f"expected ({self.num_classes}, {self.dim})")
        # A snapshot of other under its own lock first: a.merge(b) and b.merge(a) running
        # together never hold both locks, so they cannot deadlock.
        with other._lock:
            snapshot = [t.to(self.device, copy=True) for t in (other.counts, other.means, other.within_scatter,
                                                               other.class_sq)]
        with self._lock:
            self._merge(*snapshot)
        return self

    def _flat(self) -> Tensor:
        return torch.cat([self.counts, self.means.reshape(-1), self.within_scatter.reshape(-1), self.class_sq])

    def _unflat(self, flat: Tensor):
        K, d = self.num_classes, self.dim
        counts, means, scatter, class_sq = torch.split(flat, [K, K * d, d * d, K])
        return counts, means.view(K, d), scatter.view(d, d), class_sq

    @torch.no_grad()
    def all_reduce(self, group=None) -> "NCStats":
        """Combine the states of all ranks of ``group`` (torch.distributed, gloo or NCCL): every
        rank ends with the statistics of all data, bit-identical across ranks (the states are
        gathered and merged in rank order). The state must live on a device the backend
        supports (CUDA for NCCL)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce: torch.distributed is not initialised (call init_process_group first)")
        with self._lock:
            flat = self._flat()
            gathered = [torch.empty_like(flat) for _ in range(dist.get_world_size(group))]
            dist.all_gather(gathered, flat, group=group)
            combined = NCStats(self.num_classes, self.dim, self.device)
            for state in gathered:
                combined._merge(*self._unflat(state))
            self.counts, self.means = combined.counts, combined.means
            self.within_scatter, self.class_sq = combined.within_scatter, combined.class_sq
        return self

    def state_dict(self) -> dict:
        with self._lock:
            return {
                "num_classes": self.num_classes, "dim": self.dim, "counts": self.counts.clone(),
                "means": self.means.clone(), "within_scatter": self.within_scatter.clone(),
                "class_sq": self.class_sq.clone(),
            }

    def load_state_dict(self, state: dict) -> None:
        """Replace the state by ``state`` (from :meth:`state_dict`), after checking every
        entry: ValueError naming the field, and this object unchanged, unless (K, d) match,
        every tensor is real floating point of the right shape and finite, counts are whole
        numbers ≥ 0, ``class_sq`` ≥ 0 and ``within_scatter`` is symmetric positive
        semi-definite to rounding."""
        values = validated_state(state, self.num_classes, self.dim, self.device)
        with self._lock:
            self.counts, self.means, self.within_scatter, self.class_sq = values

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def global_mean(self, global_mean: str = "samples") -> Tensor:
        """μ_G (d,): the mean of all samples (default, Zhu et al. 2021) or of the class means."""
        return global_mean_of(self.counts, self.means, check_global_mean(global_mean))

    @torch.no_grad()
    def compute(
        self, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
        nc1_per_class: bool = True, global_mean: str = "samples", center_classifier: bool = False,
        second_pass: Optional["NCSecondPass"] = None, classes: str = "all",
        pairwise_dtype: Optional[torch.dtype] = None,
    ) -> NCMetrics:
        """The metrics of the data seen so far, in O(K·d + d²) memory (no K×K matrix).

        Args:
            weight: optional classifier (K, d); enables NC2, NC3, NC4 and the classifier's
                equinorm / equiangularity / max-angle.
            bias: optional (K,) (zero when omitted) for NC4 = ‖b + Wμ_G‖₂.
            nc1_per_class: True (default, Zhu et al. 2021 eq. (7)): NC1 = (1/K) tr(Σ_W Σ_B^†);
                False: tr(Σ_W Σ_B^†) without the 1/K (as some other papers plot it).
            global_mean: "samples" (default, Zhu et al. 2021: μ_G is the mean of all samples)
                or "classes" (the unweighted mean of the class means; equal when balanced).
            center_classifier: False (default, Zhu et al. 2021 eq. (8)–(9): raw rows of W) or
                True (rows minus their mean w̄, as Papyan et al. 2020 for NC2/NC3 and equinorm).
            second_pass: an :class:`NCSecondPass` fed the data again; fills its metrics.
            classes: "all" (default): every class must have samples, else ValueError listing
                the empty ones; "observed": every metric runs over the classes with samples
                only (K becomes their number, W and b lose the other rows; reported as
                ``classes_used``) — usual for a vocabulary, where some tokens never occur.
            pairwise_dtype: precision of the O(K²·d) pairwise tiles (max-angle, CDNV):
                torch.float64, torch.float32 (~4× the speed on CPU; cosines to ~√d·2⁻²⁴, see
                ``ncfast.ncstats_pairwise``), or None: float64 up to 8192 classes, float32 above.
        """
        with self._lock, _one_cpu_thread(self.device, self.num_classes * self.dim <= 1 << 20):
            return self._compute(weight, bias, nc1_per_class, global_mean, center_classifier, second_pass,
                                 classes, pairwise_dtype)

    def _compute(self, weight, bias, nc1_per_class, global_mean, center_classifier, second_pass, classes,
                 pairwise_dtype) -> NCMetrics:
        global_mean = check_global_mean(global_mean)
        if second_pass is not None and not isinstance(second_pass, NCSecondPass):
            raise TypeError(f"second_pass: expected NCSecondPass, got {type(second_pass).__name__}")
        w, b = check_classifier(weight, bias, self.num_classes, self.dim, self.device)
        index = observed_index(self.counts, classes, "compute")
        values = state_metrics(self.counts, self.means, self.class_sq, self.within_scatter, w, b, index,
                               nc1_per_class=nc1_per_class, global_mean=global_mean,
                               center_classifier=center_classifier, pairwise_dtype=pairwise_dtype)
        if second_pass is not None:
            values.update(second_pass.result())
        return NCMetrics(**values)

    def second_pass(self, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, **kwargs) -> "NCSecondPass":
        """A :class:`NCSecondPass` over this state's finished means (see its arguments)."""
        return NCSecondPass(self, weight, bias, **kwargs)


def nc_metrics(
    features: Tensor, target: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
    num_classes: Optional[int] = None, numerical_rank: bool = False, bins: int = 4000, **flags,
) -> NCMetrics:
    """All metrics of (features (N, d), target (N,)) in one call: the same numbers as
    :class:`NCStats` plus a :class:`NCSecondPass` over the same data. ``num_classes``
    defaults to ``target.max() + 1``; ``flags`` are those of :meth:`NCStats.compute`."""
    if not isinstance(features, Tensor) or features.dim() != 2:
        raise ValueError("features: expected a tensor of shape (N, d)")
    if isinstance(target, Tensor) and (target.is_floating_point() or target.is_complex()):
        raise TypeError(f"target: expected integer class indices, got {target.dtype}")
    if num_classes is None:
        if not isinstance(target, Tensor) or target.numel() == 0:
            raise ValueError("target: needs at least one sample, or pass num_classes")
        num_classes = int(target.max()) + 1
    stats = NCStats(num_classes, features.shape[1], device=features.device).update(features, target)
    second = NCSecondPass(stats, weight, bias, global_mean=flags.get("global_mean", "samples"), bins=bins,
                          numerical_rank=numerical_rank, classes=flags.get("classes", "all"))
    second.update(features, target)
    return stats.compute(weight, bias, second_pass=second, **flags)
