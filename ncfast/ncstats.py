"""Streaming neural-collapse statistics (SPEC §3): exact in the collapsed regime, one pass,
mergeable across processes.

:class:`NCStats` keeps, in float64, the per-class counts n_k, the class means μ_k and the
within-class scatter M_W = Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ, and folds each batch in with
Chan et al.'s pairwise update::

    M_W += M_W^batch + Σ_k (n_k^a n_k^b / (n_k^a + n_k^b)) (μ_k^a − μ_k^b)(μ_k^a − μ_k^b)ᵀ

where M_W^batch is the batch's scatter around its *own* class means. The raw-moment form
E[hhᵀ] − Σ n_k μ_k μ_kᵀ/N is never formed: when NC1 ≪ 1 its two terms cancel to the last digit.

Per batch the work is one fused kernel (per-class counts and float64 sums, and the features
centred on class means, written in float32 — float64 for float64 features) and one Gram
``Cᵀ C`` (BLAS on CPU, cuBLAS with TF32 off on CUDA); Chan's correction is the Gram of K more
rows (K·d² flops). On CPU, once every class of a batch has been seen, the kernel centres on
the running means and reads the batch once; the correction rows of many such batches are
then subtracted together in one Gram (see ``csrc/ncstats.cpp``).
:class:`NCSecondPass` streams the same data again with the finished means for the metrics that
need them (NCC mismatch, cosine margins, numerical rank). :func:`nc_metrics` does both at once.

Features are rows: ``features`` (N, d), ``target`` (N,), classifier ``weight`` (K, d),
``bias`` (K,) — the papers store features as columns.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Optional

import torch
from torch import Tensor

from . import _backend, _checks
from .reference import ncstats as reference

GLOBAL_MEANS = ("samples", "classes")
DEFAULT_QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)


# --------------------------------------------------------------------------------------------
# backends: (features (N, d), target (N,) int64, stats, centred (N, d), correction (K, d)) ->
# the batch's (counts, means, class_sq) in float64 and a sign s. They fill ``centred`` (C) and
# ``correction`` (R) so that CᵀC + s·RᵀR is the batch scatter plus Chan's correction. The
# torch and Triton backends centre on the batch means ν_k and R = _chan_rows (s = +1); the C++
# one centres on the running means μ_k when it can, reading the batch once (s = −1, see
# csrc/ncstats.cpp).
# --------------------------------------------------------------------------------------------
def _gram_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chan_rows(counts_a: Tensor, means_a: Tensor, counts_b: Tensor, means_b: Tensor) -> Tensor:
    """Rows r_k = √(n_k^a n_k^b/(n_k^a + n_k^b)) (μ_k^b − μ_k^a) (K, d): Σ_k r_k r_kᵀ is Chan's
    correction term. Zero where either side lacks class k (its mean is meaningless there)."""
    total = counts_a + counts_b
    pair = torch.where((counts_a > 0) & (counts_b > 0), counts_a * counts_b / total.clamp(min=1), 0.0)
    return pair.sqrt()[:, None] * (means_b - means_a)


def _cpp_batch(features: Tensor, target: Tensor, stats: "NCStats", centred: Tensor, correction: Tensor):
    from . import _C

    K, d = stats.num_classes, stats.dim
    counts = torch.empty(K, dtype=torch.float64)
    means = torch.empty(K, d, dtype=torch.float64)
    class_sq = torch.empty(K, dtype=torch.float64)
    sign = _C.ncstats_batch(
        _backend.cpu_buffer(features), _backend.cpu_buffer(target), str(features.dtype).removeprefix("torch."),
        stats.counts.numpy(), stats.means.numpy(), counts.numpy(), means.numpy(), centred.numpy(),
        correction.numpy(), class_sq.numpy(), torch.get_num_threads(),
    )
    return counts, means, class_sq, sign


def _triton_batch(features: Tensor, target: Tensor, stats: "NCStats", centred: Tensor, correction: Tensor):
    from .triton_kernels import ncstats as kernels

    counts, means, class_sq = kernels.batch_moments(features, target, stats.num_classes, centred)
    _check_finite(means)
    correction.copy_(_chan_rows(stats.counts, stats.means, counts, means))
    return counts, means, class_sq, 1


def _torch_batch(features: Tensor, target: Tensor, stats: "NCStats", centred: Tensor, correction: Tensor):
    counts, means, c, class_sq = reference.batch_moments(features, target, stats.num_classes)
    _check_finite(means)
    centred.copy_(c)
    correction.copy_(_chan_rows(stats.counts, stats.means, counts, means))
    return counts, means, class_sq, 1


_BACKEND_BATCH = {"cpp": _cpp_batch, "triton": _triton_batch, "torch": _torch_batch}


@contextlib.contextmanager
def _ieee_fp32_matmul(device: torch.device):
    """TF32 off for the Gram: its 10-bit mantissa wipes out NC1 in the collapsed regime."""
    if device.type != "cuda":
        yield
        return
    matmul = torch.backends.cuda.matmul
    previous = matmul.fp32_precision
    matmul.fp32_precision = "ieee"
    try:
        yield
    finally:
        matmul.fp32_precision = previous


# --------------------------------------------------------------------------------------------
# argument checking
# --------------------------------------------------------------------------------------------
def _check_count(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value


def _check_batch(features, target, num_classes: int, dim: int, device: torch.device):
    _checks.float_tensor("features", features, f"(N, {dim})")
    _checks.class_indices("target", target)
    if features.dim() != 2 or features.shape[1] != dim:
        raise ValueError(f"features: expected shape (N, {dim}), got {tuple(features.shape)}")
    if target.shape != (features.shape[0],):
        raise ValueError(f"target: expected shape ({features.shape[0]},) to match features, got {tuple(target.shape)}")
    if features.device != device:
        raise ValueError(f"features: is on {features.device} but the statistics live on {device} "
                         f"(pass device= when creating them)")
    if target.device != device:
        raise ValueError(f"target: is on {target.device} but features are on {device}")
    target = target.to(torch.int64).contiguous()
    return features.detach().contiguous(), target


def _check_target_range(target: Tensor, num_classes: int) -> None:
    bad = (target < 0) | (target >= num_classes)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"target: value {int(target[i])} at index {i} is out of range [0, {num_classes})")


def _check_finite(means: Tensor) -> None:
    # A NaN or ±inf feature makes its class sum non-finite: K·d values to check, not N·d.
    if not bool(torch.isfinite(means).all()):
        raise ValueError("features: contains NaN or infinite values")


def _check_classifier(weight, bias, num_classes: int, dim: int, device: torch.device):
    if weight is None:
        if bias is not None:
            raise ValueError("bias: given without weight; the classifier metrics need both")
        return None, None
    if not isinstance(weight, Tensor) or not weight.is_floating_point():
        raise TypeError(f"weight: expected a floating-point tensor of shape ({num_classes}, {dim})")
    if weight.shape != (num_classes, dim):
        raise ValueError(f"weight: expected shape ({num_classes}, {dim}), got {tuple(weight.shape)}")
    w = weight.detach().to(device, torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight: contains NaN or infinite values")
    if bias is None:
        b = torch.zeros(num_classes, dtype=torch.float64, device=device)
    else:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias: expected a floating-point tensor of shape ({num_classes},)")
        if bias.shape != (num_classes,):
            raise ValueError(f"bias: expected shape ({num_classes},), got {tuple(bias.shape)}")
        b = bias.detach().to(device, torch.float64)
        if not bool(torch.isfinite(b).all()):
            raise ValueError("bias: contains NaN or infinite values")
    return w, b


def _check_global_mean(global_mean: str) -> str:
    if global_mean not in GLOBAL_MEANS:
        raise ValueError(f"global_mean: expected one of {GLOBAL_MEANS}, got {global_mean!r}")
    return global_mean


# --------------------------------------------------------------------------------------------
# the metrics
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class NCMetrics:
    """Neural-collapse metrics (SPEC §3). Classifier metrics are ``None`` without a weight;
    second-pass metrics are ``None`` without a :class:`NCSecondPass`.

    ``str(metrics)`` is a two-column table; :meth:`as_dict` gives plain Python values.
    """

    num_samples: int
    num_classes: int
    dim: int
    nc1: float  #: (1/K) tr(Σ_W Σ_B^†), seed 003 eq. (7)
    equinorm_means: float  #: std/mean of ‖μ_k − μ_G‖
    equiangularity_means: float  #: std over k≠l of cos∠(μ_k − μ_G, μ_l − μ_G)
    max_angle_means: float  #: mean over k≠l of |cos + 1/(K−1)|
    cdnv: float  #: mean over k≠l of (σ_k² + σ_l²)/(2‖μ_k − μ_l‖²)
    nc2: Optional[float] = None  #: ‖WWᵀ/‖WWᵀ‖_F − ETF‖_F, seed 003 eq. (8)
    nc3: Optional[float] = None  #: ‖WM̄/‖WM̄‖_F − ETF‖_F, seed 003 eq. (9)
    nc4: Optional[float] = None  #: ‖b + Wμ_G‖₂, seed 003 eq. (10)
    equinorm_classifier: Optional[float] = None
    equiangularity_classifier: Optional[float] = None
    max_angle_classifier: Optional[float] = None
    ncc_mismatch: Optional[float] = None  #: fraction with argmax(Wh+b) ≠ argmin_k ‖h − μ_k‖
    cosine_margin_quantiles: Optional[dict] = None  #: {q: value}, from the histogram
    cosine_margin_histogram: Optional[dict] = None  #: {"edges": [...], "counts": [...]}
    numerical_rank: Optional[float] = None  #: (1/K) Σ_k (‖H_k‖_*/‖H_k‖_F)², seed 000 §4

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        rows = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None or field.name == "cosine_margin_histogram":
                continue
            if field.name == "cosine_margin_quantiles":
                for q, v in value.items():
                    rows.append((f"cosine_margin q={q:g}", f"{v:.6g}"))
            elif isinstance(value, float):
                rows.append((field.name, f"{value:.6g}"))
            else:
                rows.append((field.name, str(value)))
        width = max(len(name) for name, _ in rows)
        lines = [f"{'metric':<{width}}  value", f"{'-' * width}  {'-' * 12}"]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        return "\n".join(lines)


def _std_mean_ratio(values: Tensor) -> float:
    return float(values.std() / values.mean())


def _pairwise_cosines(vectors: Tensor) -> Tensor:
    """Cosines of all ordered pairs k≠l of the rows of ``vectors`` (K(K−1),)."""
    unit = vectors / vectors.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    return cos[~torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device)]


def _global_mean(counts: Tensor, means: Tensor, global_mean: str) -> Tensor:
    if global_mean == "samples":
        return (counts[:, None] * means).sum(0) / counts.sum()
    return means.mean(0)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Runs torch's CPU ops single-threaded inside the block (no-op for other devices).

    ``compute`` is small work (at most d²·K flops): one thread does it in milliseconds, while
    multithreaded BLAS/LAPACK calls on matrices this small were measured 100× slower (a QR of
    512×100: 0.14 s instead of 0.8 ms) whenever another process keeps a core busy."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _nc1(within_scatter: Tensor, num_samples: float, mbar: Tensor, per_class: bool) -> float:
    """(1/K) tr(Σ_W Σ_B^†) through the thin SVD M̄ = U S Vᵀ (d×K): with Σ_B = M̄M̄ᵀ/K,
    Σ_B^† = K Σ_i s_i^{-2} u_i u_iᵀ, so (1/K) tr(Σ_W Σ_B^†) = Σ_i s_i^{-2} u_iᵀ Σ_W u_i.

    Singular values are kept by torch.linalg.pinv's default rule applied to Σ_B (d×d) in
    float64: eigenvalue s_i²/K above max(d, d)·eps times the largest. Σ_B is never formed, so
    its null space (rank ≤ K−1 ≪ d) never produces spurious tiny eigenvalues to invert."""
    d, K = mbar.shape
    # Thin QR first, then the SVD of the small triangle: the same U S, without a d×K SVD.
    q, r = torch.linalg.qr(mbar)
    u_r, s, _ = torch.linalg.svd(r)
    u = q @ u_r
    tolerance = d * torch.finfo(torch.float64).eps * float(s.max()) ** 2
    keep = s * s > tolerance
    u, s = u[:, keep], s[keep]
    sigma_w = within_scatter / num_samples
    trace_over_k = float(((u * (sigma_w @ u)).sum(0) / (s * s)).sum())
    return trace_over_k if per_class else trace_over_k * K


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
    """

    def __init__(self, num_classes: int, dim: int, device=None):
        self.num_classes = _check_count("num_classes", num_classes, 2)
        self.dim = _check_count("dim", dim, 1)
        self.device = torch.device("cpu" if device is None else device)
        f64 = dict(dtype=torch.float64, device=self.device)
        self.counts = torch.zeros(num_classes, **f64)
        self.means = torch.zeros(num_classes, dim, **f64)
        self._within_scatter = torch.zeros(dim, dim, **f64)
        self._pending: Optional[Tensor] = None  # correction rows still to subtract from M_W
        self._pending_rows = 0
        self.class_sq = torch.zeros(num_classes, **f64)
        self._workspace: Optional[Tensor] = None  # centred-features buffer, reused across batches

    # Subtracted correction rows of many batches wait here and leave in one Gram (≤ 32 MB).
    _PENDING_BYTES = 1 << 25

    def _buffers(self, rows: int, dtype: torch.dtype, collect: bool):
        """(centred (rows, d), correction (K, d)): views of buffers reused across batches
        (a fresh 16 MB allocation per batch costs page faults). ``collect``: room for the
        correction rows of many batches (only the C++ backend subtracts them)."""
        need = rows * self.dim
        if self._workspace is None or self._workspace.dtype != dtype or self._workspace.numel() < need:
            self._workspace = torch.empty(need, dtype=dtype, device=self.device)
        if self._pending is None or self._pending.dtype != dtype or (collect and self._pending.shape[0] == self.num_classes):
            self._flush()
            capacity = max(1, self._PENDING_BYTES // (self.num_classes * self.dim * dtype.itemsize)) if collect else 1
            self._pending = torch.empty(capacity * self.num_classes, self.dim, dtype=dtype, device=self.device)
        if self._pending_rows + self.num_classes > self._pending.shape[0]:
            self._flush()
        slot = self._pending[self._pending_rows:self._pending_rows + self.num_classes]
        return self._workspace[:need].view(rows, self.dim), slot

    def _flush(self) -> None:
        """Subtracts the pending correction rows R: M_W −= RᵀR (one Gram)."""
        if self._pending_rows:
            rows = self._pending[:self._pending_rows]
            with _ieee_fp32_matmul(self.device):
                self._within_scatter.sub_(rows.T @ rows)
            self._pending_rows = 0

    @property
    def within_scatter(self) -> Tensor:
        """M_W (d, d) float64 = Σ_i (h_i − μ_{y_i})(h_i − μ_{y_i})ᵀ."""
        self._flush()
        return self._within_scatter

    @within_scatter.setter
    def within_scatter(self, value: Tensor) -> None:
        self._pending_rows = 0
        self._within_scatter = value

    @torch.no_grad()
    def update(self, features: Tensor, target: Tensor) -> "NCStats":
        """Fold in a batch: ``features`` (N, d) float32/float64/bfloat16/float16 on the stats'
        device, ``target`` (N,) integer classes in [0, K). Any N (0 and 1 included), any class
        mix. Raises ValueError (state unchanged) on bad shapes, targets or non-finite features.

        The batch scatter comes from one Gram CᵀC of the rows centred on class means (the
        batch's or the running ones) in float32 (float64 for float64 features): float32 keeps
        ~7 digits of the *within-class* spread however large the means are. Chan's correction
        adds K rows' Gram (K·d² flops), collected over many batches when it is subtracted."""
        features, target = _check_batch(features, target, self.num_classes, self.dim, self.device)
        if features.shape[0] == 0:
            return self
        backend = _backend.backend_for(features)
        if backend != "cpp":
            _check_target_range(target, self.num_classes)
        centred, correction = self._buffers(features.shape[0], _gram_dtype(features.dtype), backend == "cpp")
        counts, means, class_sq, sign = _BACKEND_BATCH[backend](features, target, self, centred, correction)
        with _ieee_fp32_matmul(self.device):
            gram = centred.T @ centred
            if sign > 0:
                gram.addmm_(correction.T, correction)
            else:
                self._pending_rows += self.num_classes
        if backend == "cpp":
            from . import _C

            _C.ncstats_fold(self.counts.numpy(), self.means.numpy(), self.class_sq.numpy(),
                            self._within_scatter.numpy(), counts.numpy(), means.numpy(), class_sq.numpy(),
                            gram.numpy())
        else:
            self._fold(counts, means, class_sq, gram)
        return self

    def _fold(self, counts: Tensor, means: Tensor, class_sq: Tensor, scatter: Tensor) -> None:
        """Chan's pairwise merge of a second state whose ``scatter`` already holds its own
        scatter plus the correction Σ_k r_k r_kᵀ (:func:`_chan_rows`)."""
        total = self.counts + counts
        delta = means - self.means
        pair = torch.where((self.counts > 0) & (counts > 0), self.counts * counts / total.clamp(min=1), 0.0)
        self.within_scatter.add_(scatter)
        self.class_sq.add_(class_sq + pair * (delta * delta).sum(1))
        self.means.addcmul_(delta, (counts / total.clamp(min=1))[:, None])
        self.counts = total

    def _merge(self, counts: Tensor, means: Tensor, scatter: Tensor, class_sq: Tensor) -> None:
        rows = _chan_rows(self.counts, self.means, counts, means)
        self._fold(counts, means, class_sq, torch.addmm(scatter, rows.T, rows))

    @torch.no_grad()
    def merge(self, other: "NCStats") -> "NCStats":
        """Fold in another state (same K and d): the statistics of both data sets together."""
        if not isinstance(other, NCStats):
            raise TypeError(f"other: expected NCStats, got {type(other).__name__}")
        if (other.num_classes, other.dim) != (self.num_classes, self.dim):
            raise ValueError(f"other: has (K, d) = ({other.num_classes}, {other.dim}), "
                             f"expected ({self.num_classes}, {self.dim})")
        to = dict(device=self.device)
        self._merge(other.counts.to(**to), other.means.to(**to), other.within_scatter.to(**to), other.class_sq.to(**to))
        return self

    def _flat(self) -> Tensor:
        return torch.cat([self.counts, self.means.reshape(-1), self.within_scatter.reshape(-1), self.class_sq])

    def _unflat(self, flat: Tensor):
        K, d = self.num_classes, self.dim
        sizes = [K, K * d, d * d, K]
        counts, means, scatter, class_sq = torch.split(flat, sizes)
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
        return {
            "num_classes": self.num_classes, "dim": self.dim, "counts": self.counts.clone(),
            "means": self.means.clone(), "within_scatter": self.within_scatter.clone(),
            "class_sq": self.class_sq.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        if (state.get("num_classes"), state.get("dim")) != (self.num_classes, self.dim):
            raise ValueError(f"state: has (K, d) = ({state.get('num_classes')}, {state.get('dim')}), "
                             f"expected ({self.num_classes}, {self.dim})")
        K, d = self.num_classes, self.dim
        for name, shape in (("counts", (K,)), ("means", (K, d)), ("within_scatter", (d, d)), ("class_sq", (K,))):
            value = state.get(name)
            if not isinstance(value, Tensor) or value.shape != shape:
                raise ValueError(f"state: entry {name!r} must be a tensor of shape {shape}")
            setattr(self, name, value.to(self.device, torch.float64).clone())

    @property
    def num_samples(self) -> int:
        return int(self.counts.sum())

    def _check_complete(self) -> None:
        missing = (self.counts == 0).nonzero().flatten().tolist()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (", ..." if len(missing) > 10 else "")
            raise ValueError(f"compute: {len(missing)} of {self.num_classes} classes have no samples ({shown}); "
                             f"every class needs at least one")

    def global_mean(self, global_mean: str = "samples") -> Tensor:
        """μ_G (d,): the mean of all samples (default, seed 003) or of the class means."""
        return _global_mean(self.counts, self.means, _check_global_mean(global_mean))

    @torch.no_grad()
    def compute(
        self, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
        nc1_per_class: bool = True, global_mean: str = "samples", center_classifier: bool = False,
        second_pass: Optional["NCSecondPass"] = None,
    ) -> NCMetrics:
        """The metrics of the data seen so far.

        Args:
            weight: optional classifier (K, d); enables NC2, NC3, NC4 and the classifier's
                equinorm / equiangularity / max-angle.
            bias: optional (K,) (zero when omitted) for NC4 = ‖b + Wμ_G‖₂.
            nc1_per_class: True (default, seed 003 eq. (7)): NC1 = (1/K) tr(Σ_W Σ_B^†);
                False: tr(Σ_W Σ_B^†) without the 1/K (as some other papers plot it).
            global_mean: "samples" (default, seed 003: μ_G is the mean of all samples) or
                "classes" (the unweighted mean of the class means; equal when balanced).
            center_classifier: False (default, seed 003 eq. (8)–(9): raw rows of W) or True
                (rows minus their mean w̄, as Papyan et al. 2020 for NC2/NC3 and equinorm).
            second_pass: an :class:`NCSecondPass` fed the data again; fills its metrics.
        """
        with _one_cpu_thread(self.device):
            return self._compute(weight, bias, nc1_per_class, global_mean, center_classifier, second_pass)

    def _compute(self, weight, bias, nc1_per_class, global_mean, center_classifier, second_pass) -> NCMetrics:
        global_mean = _check_global_mean(global_mean)
        self._check_complete()
        K = self.num_classes
        n = self.counts
        mu_g = _global_mean(n, self.means, global_mean)
        centred_means = self.means - mu_g
        values = dict(
            num_samples=self.num_samples, num_classes=K, dim=self.dim,
            nc1=_nc1(self.within_scatter, float(n.sum()), centred_means.T, nc1_per_class),
            equinorm_means=_std_mean_ratio(centred_means.norm(dim=1)),
        )
        cos = _pairwise_cosines(centred_means)
        values["equiangularity_means"] = float(cos.std())
        values["max_angle_means"] = float((cos + 1.0 / (K - 1)).abs().mean())
        class_var = self.class_sq / n
        gram = centred_means @ centred_means.T
        distance_sq = gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram
        off = ~torch.eye(K, dtype=torch.bool, device=self.device)
        values["cdnv"] = float(((class_var[:, None] + class_var[None, :]) / (2 * distance_sq))[off].mean())
        w, b = _check_classifier(weight, bias, K, self.dim, self.device)
        if w is not None:
            etf = reference.etf(K, device=self.device)
            wc = w - w.mean(0) if center_classifier else w
            wwt = wc @ wc.T
            values["nc2"] = float((wwt / wwt.norm() - etf).norm())
            wm = wc @ centred_means.T
            values["nc3"] = float((wm / wm.norm() - etf).norm())
            values["nc4"] = float((b + w @ mu_g).norm())
            values["equinorm_classifier"] = _std_mean_ratio(wc.norm(dim=1))
            cos_w = _pairwise_cosines(wc)
            values["equiangularity_classifier"] = float(cos_w.std())
            values["max_angle_classifier"] = float((cos_w + 1.0 / (K - 1)).abs().mean())
        if second_pass is not None:
            if not isinstance(second_pass, NCSecondPass):
                raise TypeError(f"second_pass: expected NCSecondPass, got {type(second_pass).__name__}")
            values.update(second_pass.result())
        return NCMetrics(**values)

    def second_pass(self, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, **kwargs) -> "NCSecondPass":
        """A :class:`NCSecondPass` over this state's finished means (see its arguments)."""
        return NCSecondPass(self, weight, bias, **kwargs)


class NCSecondPass:
    """The metrics that need the finished class means, streamed over the data a second time.

    * NCC mismatch (Papyan's NC4): fraction of samples whose classifier decision
      argmax_k (Wh + b)_k differs from the nearest class mean argmin_k ‖h − μ_k‖ (needs W);
    * cosine margin (seed 000 §4): cos θ_y − max_{j≠y} cos θ_j with θ_j the angle between
      h − μ_G and w_j − w̄ (needs W). Kept as a histogram of ``bins`` equal bins on [−2, 2]
      plus the exact min and max, not N values; quantiles are read off the histogram
      (:meth:`quantiles`, error ≤ one bin width, 4/bins);
    * numerical rank (seed 000 §4) (1/K) Σ_k (‖H_k‖_*/‖H_k‖_F)² of the raw class feature
      matrices, only with ``numerical_rank=True``: it keeps a d×d Gram per class (K·d² floats),
      accumulated around the known class means so it stays exact in the collapsed regime.

    Args:
        stats: the finished :class:`NCStats` (its means and μ_G are copied now).
        weight, bias: classifier (K, d) and (K,) (bias zero when omitted).
        global_mean: which μ_G the cosine margins centre on (see :meth:`NCStats.compute`).
        bins: histogram bins for the cosine margins.
        numerical_rank: also accumulate the per-class Grams.

    State is counts and histograms: :meth:`merge` and :meth:`all_reduce` combine exactly.
    """

    def __init__(self, stats: NCStats, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, *,
                 global_mean: str = "samples", bins: int = 4000, numerical_rank: bool = False):
        if not isinstance(stats, NCStats):
            raise TypeError(f"stats: expected NCStats, got {type(stats).__name__}")
        stats._check_complete()
        self.num_classes, self.dim, self.device = stats.num_classes, stats.dim, stats.device
        self.bins = _check_count("bins", bins, 1)
        self.means = stats.means.clone()
        self.counts = stats.counts.clone()
        self.mu_g = stats.global_mean(global_mean)
        self.weight, self.bias = _check_classifier(weight, bias, self.num_classes, self.dim, self.device)
        if self.weight is not None:
            centred_rows = self.weight - self.weight.mean(0)
            self._unit_rows = centred_rows / centred_rows.norm(dim=1, keepdim=True)
        i64 = dict(dtype=torch.int64, device=self.device)
        self.samples = torch.zeros((), **i64)
        self.mismatches = torch.zeros((), **i64)
        self.histogram = torch.zeros(self.bins, **i64)
        inf = float("inf")
        self.margin_min = torch.full((), inf, dtype=torch.float64, device=self.device)
        self.margin_max = torch.full((), -inf, dtype=torch.float64, device=self.device)
        self.class_grams = (
            torch.zeros(self.num_classes, self.dim, self.dim, dtype=torch.float64, device=self.device)
            if numerical_rank else None
        )

    @torch.no_grad()
    def update(self, features: Tensor, target: Tensor) -> "NCSecondPass":
        """Stream a batch (same arguments as :meth:`NCStats.update`)."""
        features, target = _check_batch(features, target, self.num_classes, self.dim, self.device)
        _check_target_range(target, self.num_classes)
        h = features.to(torch.float64)
        if h.shape[0] == 0:
            return self
        if not bool(torch.isfinite(h).all()):
            raise ValueError("features: contains NaN or infinite values")
        self.samples += h.shape[0]
        if self.weight is not None:
            decision = (h @ self.weight.T + self.bias).argmax(1)
            # argmin_k ‖h − μ_k‖² = argmin_k (‖μ_k‖² − 2 h·μ_k)
            nearest = ((self.means * self.means).sum(1) - 2 * h @ self.means.T).argmin(1)
            self.mismatches += (decision != nearest).sum()
            hc = h - self.mu_g
            cos = (hc @ self._unit_rows.T) / hc.norm(dim=1, keepdim=True)
            rows = torch.arange(h.shape[0], device=self.device)
            true_cos = cos[rows, target]
            cos[rows, target] = -float("inf")
            margin = true_cos - cos.max(1).values
            self.margin_min = torch.minimum(self.margin_min, margin.min())
            self.margin_max = torch.maximum(self.margin_max, margin.max())
            index = ((margin + 2) * (self.bins / 4)).floor().clamp(0, self.bins - 1).to(torch.int64)
            self.histogram += torch.bincount(index, minlength=self.bins)
        if self.class_grams is not None:
            centred = h - self.means[target]
            for k in target.unique().tolist():
                rows_k = centred[target == k]
                self.class_grams[k].addmm_(rows_k.T, rows_k)
        return self

    def merge(self, other: "NCSecondPass") -> "NCSecondPass":
        """Fold in another second pass over other data (same statistics and classifier)."""
        if not isinstance(other, NCSecondPass):
            raise TypeError(f"other: expected NCSecondPass, got {type(other).__name__}")
        if other.bins != self.bins or (other.class_grams is None) != (self.class_grams is None):
            raise ValueError("other: was created with different bins or numerical_rank")
        self.samples += other.samples.to(self.device)
        self.mismatches += other.mismatches.to(self.device)
        self.histogram += other.histogram.to(self.device)
        self.margin_min = torch.minimum(self.margin_min, other.margin_min.to(self.device))
        self.margin_max = torch.maximum(self.margin_max, other.margin_max.to(self.device))
        if self.class_grams is not None:
            self.class_grams += other.class_grams.to(self.device)
        return self

    def all_reduce(self, group=None) -> "NCSecondPass":
        """Sum the second-pass state over all ranks of ``group`` (integer sums and min/max are
        exact, so every rank ends identical)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("all_reduce: torch.distributed is not initialised (call init_process_group first)")
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
        """The second-pass fields of :class:`NCMetrics`."""
        if int(self.samples) != int(self.counts.sum()):
            raise ValueError(f"second_pass: saw {int(self.samples)} samples, the statistics {int(self.counts.sum())}; "
                             f"feed it the same data")
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
                          numerical_rank=numerical_rank)
    second.update(features, target)
    return stats.compute(weight, bias, second_pass=second, **flags)
