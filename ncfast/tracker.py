"""Neural-collapse tracking for any training loop: hook the classifier, feed the targets.

:class:`NCTracker` registers a forward pre-hook on the last layer (an ``nn.Linear`` or an
:class:`ncfast.ETFClassifier`) for the length of an evaluation pass only. The hook streams the
features that enter the layer, with the targets the loop hands over, into :class:`ncfast.NCStats`;
:meth:`NCTracker.compute` reads W and b from the layer and returns the metrics of Papyan, Han,
Donoho (PNAS 2020) and Zhu et al. (NeurIPS 2021, "A Geometric Analysis of Neural Collapse with
Unconstrained Features", eq. (7)–(10)). Under ``torch.distributed`` the statistics of every
rank are merged exactly at the end of the pass, so each rank reports the metrics of all data.
"""

from __future__ import annotations

import contextlib
from typing import Optional, Union

from torch import Tensor, nn

from .ncstats import NCMetrics, NCSecondPass, NCStats


def _distributed(group) -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class NCTracker:
    """Neural-collapse metrics of the features entering ``layer``, measured during a pass.

    Example (three lines added to an evaluation loop)::

        tracker = ncfast.NCTracker(model.fc)           # once
        with torch.no_grad(), tracker.track():         # one evaluation pass
            for x, y in train_loader:
                tracker.observe(y)                     # the targets of the next forward
                model(x)
        print(tracker.compute().nc1)                   # W and b are read from model.fc

    Outside :meth:`track` no hook is registered, so training steps run exactly as without the
    tracker; with ``enabled=False`` :meth:`track` registers nothing either, :meth:`observe` does
    nothing and :meth:`compute` returns ``None``.

    Args:
        layer: the classifier, a module with ``weight`` (K, d) and ``bias`` (K,) or ``None``
            (``nn.Linear(d, K)``, ``ncfast.ETFClassifier(d, K)``). Its input may be (N, d) or
            (N, ..., d) with targets (N, ...), e.g. the token features of a language model
            (Wu, Papyan, NeurIPS 2024, "Linguistic Collapse").
        enabled: when False the tracker costs nothing and measures nothing.
        ignore_index: target value whose positions are left out (torch's convention: -100);
            ``None`` keeps every position.
        group: the ``torch.distributed`` process group to merge over (default: the world).
        distributed: merge the ranks' statistics at the end of each pass; ``None`` (default)
            merges whenever torch.distributed is initialised with more than one process. Under
            it every rank of ``group`` must run the pass (the merge is a collective).

    The statistics live on the layer's device, in float64 (:class:`ncfast.NCStats`).
    """

    def __init__(self, layer: nn.Module, *, enabled: bool = True, ignore_index: Optional[int] = -100,
                 group=None, distributed: Optional[bool] = None):
        weight = getattr(layer, "weight", None) if isinstance(layer, nn.Module) else None
        if not isinstance(weight, Tensor) or weight.dim() != 2:
            raise TypeError(f"layer: expected a classifier module with a weight of shape (K, d) (nn.Linear, "
                            f"ncfast.ETFClassifier), got {type(layer).__name__}")
        if weight.shape[0] < 2:
            raise ValueError(f"layer: has {weight.shape[0]} output, neural collapse needs K >= 2 classes")
        if ignore_index is not None and (isinstance(ignore_index, bool) or not isinstance(ignore_index, int)):
            raise TypeError(f"ignore_index: expected an int or None, got {type(ignore_index).__name__}")
        self.layer = layer
        self.enabled = bool(enabled)
        self.ignore_index = ignore_index
        self.group = group
        self.distributed = distributed
        self.num_classes, self.dim = weight.shape
        self.stats: Optional[NCStats] = None  # the last finished first pass
        self.second: Optional[NCSecondPass] = None  # the last finished second pass over it
        self._sink: Union[NCStats, NCSecondPass, None] = None
        self._pending: Optional[Tensor] = None

    @property
    def tracking(self) -> bool:
        """True inside :meth:`track` (the hook is registered)."""
        return self._sink is not None

    def _classifier(self):
        bias = getattr(self.layer, "bias", None)
        return self.layer.weight.detach(), (None if bias is None else bias.detach())

    @contextlib.contextmanager
    def track(self, second_pass: bool = False):
        """One pass over the data: the hook is registered on entry and removed on exit.

        ``second_pass=False`` starts new statistics (:class:`ncfast.NCStats`). Passing the same
        data again with ``second_pass=True`` adds the metrics that need the finished class
        means (NCC mismatch, cosine margins: :class:`ncfast.NCSecondPass`), with W and b as the
        layer holds them on entry. On a normal exit the pass is merged over the ranks (see
        ``distributed``) and becomes what :meth:`compute` reports; after an exception it is
        discarded."""
        if not self.enabled:
            yield self
            return
        if self.tracking:
            raise RuntimeError("track: a pass is already running; passes do not nest")
        if second_pass:
            if self.stats is None:
                raise RuntimeError("track(second_pass=True): run a first pass (track()) over the data before")
            sink = self.stats.second_pass(*self._classifier())
        else:
            sink = NCStats(self.num_classes, self.dim, device=self.layer.weight.device)
        self._sink, self._pending = sink, None
        handle = self.layer.register_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()
            self._sink, self._pending = None, None
        distributed = _distributed(self.group) if self.distributed is None else self.distributed
        if distributed:
            sink.all_reduce(self.group)
        if second_pass:
            self.second = sink
        else:
            self.stats, self.second = sink, None

    def observe(self, target: Tensor) -> None:
        """Hands over the targets of the layer's next forward call: (N,) class indices, or
        (N, ...) matching the leading dimensions of its input. A no-op when disabled."""
        if not self.enabled:
            return
        if not self.tracking:
            raise RuntimeError("observe: call it inside `with tracker.track():`")
        if not isinstance(target, Tensor):
            raise TypeError(f"target: expected a tensor of class indices, got {type(target).__name__}")
        if self._pending is not None:
            raise RuntimeError("observe: the previous targets were never used (the classifier did not run "
                               "between two observe calls)")
        self._pending = target

    def _hook(self, module: nn.Module, args: tuple) -> None:
        target, self._pending = self._pending, None
        if target is None:
            raise RuntimeError("NCTracker: the classifier ran inside track() without targets; call "
                               "tracker.observe(target) before each forward")
        features = args[0] if args else None
        if not isinstance(features, Tensor) or features.dim() == 0 or features.shape[-1] != self.dim:
            shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
            raise ValueError(f"features: the classifier's input must have shape (N, ..., {self.dim}), got {shape}")
        rows = features.reshape(-1, self.dim)
        target = target.reshape(-1).to(rows.device)
        if target.shape[0] != rows.shape[0]:
            raise ValueError(f"target: has {target.shape[0]} entries, the classifier's input "
                             f"{tuple(features.shape)} has {rows.shape[0]} feature rows")
        if self.ignore_index is not None and not target.is_floating_point():
            keep = target != self.ignore_index
            rows, target = rows[keep], target[keep]
        self._sink.update(rows, target)

    def compute(self, **flags) -> Optional[NCMetrics]:
        """The metrics of the last pass, with W and b read from the layer now; ``flags`` are
        those of :meth:`ncfast.NCStats.compute` (``nc1_per_class``, ``global_mean``,
        ``center_classifier``). ``None`` when the tracker is disabled."""
        if not self.enabled:
            return None
        if self.stats is None:
            raise RuntimeError("compute: no finished pass; run one with `with tracker.track():` first")
        weight, bias = self._classifier()
        return self.stats.compute(weight, bias, second_pass=self.second, **flags)
