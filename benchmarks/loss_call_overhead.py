"""Per-call cost of the fused losses at a small shape: forward + backward, one thread, each
case timed against its torch peer (the same arguments to ``F.cross_entropy`` or
``nn.CrossEntropyLoss``, where torch has them) and against plain ``F.cross_entropy``, as the
medians of paired rounds in one process.

    python benchmarks/loss_call_overhead.py [--rows 128] [--classes 10] [--rounds 41]

Losses with ``reduction="none"`` are summed before ``.backward()``, on both sides.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import ncfast


def _step_time(loss_fn, logits, target, repeats: int) -> float:
    start = time.perf_counter()
    for _ in range(repeats):
        x = logits.detach().requires_grad_(True)
        loss = loss_fn(x, target)
        (loss.sum() if loss.dim() else loss).backward()
    return (time.perf_counter() - start) / repeats


def _cases(num_classes: int) -> dict:
    """name -> (ncfast step, its torch peer or None)."""
    weight = torch.rand(num_classes) + 0.5
    ignored = {"ignore_index": 3}  # a class index that occurs in the targets
    return {
        "cross_entropy": (ncfast.cross_entropy, F.cross_entropy),
        "CrossEntropyLoss()": (ncfast.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()),
        "reduction='none'": (lambda x, y: ncfast.cross_entropy(x, y, reduction="none"),
                             lambda x, y: F.cross_entropy(x, y, reduction="none")),
        "reduction='sum'": (lambda x, y: ncfast.cross_entropy(x, y, reduction="sum"),
                            lambda x, y: F.cross_entropy(x, y, reduction="sum")),
        "weight": (lambda x, y: ncfast.cross_entropy(x, y, weight), lambda x, y: F.cross_entropy(x, y, weight)),
        "ignore_index=3": (lambda x, y: ncfast.cross_entropy(x, y, **ignored),
                           lambda x, y: F.cross_entropy(x, y, **ignored)),
        "label_smoothing=0.1": (lambda x, y: ncfast.cross_entropy(x, y, label_smoothing=0.1),
                                lambda x, y: F.cross_entropy(x, y, label_smoothing=0.1)),
        "focal γ=3": (lambda x, y: ncfast.focal_loss(x, y, gamma=3.0), None),
        "focal γ=3, alpha=0.25": (lambda x, y: ncfast.focal_loss(x, y, gamma=3.0, alpha=0.25), None),
        "rescaled_mse κ=1 β=15": (lambda x, y: ncfast.rescaled_mse(x, y, kappa=1.0, beta=15.0), None),
        "rescaled_mse, 'none'": (lambda x, y: ncfast.rescaled_mse(x, y, beta=15.0, reduction="none"), None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--only", nargs="*", help="case names to run (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logits = torch.randn(args.rows, args.classes)
    target = torch.randint(0, args.classes, (args.rows,))
    cases = _cases(args.classes)
    if args.only:
        cases = {name: cases[name] for name in args.only}
    steps = {"F.cross_entropy": F.cross_entropy}
    for name, (ours, peer) in cases.items():
        steps[name] = ours
        if peer is not None:
            steps[f"{name} (torch)"] = peer
    for fn in steps.values():  # warm-up
        _step_time(fn, logits, target, args.repeats)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, fn in steps.items():
            times[name].append(_step_time(fn, logits, target, args.repeats))

    def ratio(a: str, b: str) -> str:
        return f"{statistics.median(x / y for x, y in zip(times[a], times[b])):.2f}"

    print(f"({args.rows}, {args.classes}) float32, forward + backward, 1 thread, medians of {args.rounds} "
          "paired rounds; ratios are medians of per-round ratios")
    print("| ncfast case | ncfast µs | torch peer µs | ncfast / peer | ncfast / F.cross_entropy |")
    print("|---|---|---|---|---|")
    for name, (_, peer) in cases.items():
        peer_name = f"{name} (torch)"
        peer_time = f"{statistics.median(times[peer_name]) * 1e6:.1f}" if peer is not None else "—"
        peer_ratio = ratio(name, peer_name) if peer is not None else "—"
        print(f"| {name} | {statistics.median(times[name]) * 1e6:.1f} | {peer_time} | {peer_ratio} | "
              f"{ratio(name, 'F.cross_entropy')} |")
    print(f"F.cross_entropy: {statistics.median(times['F.cross_entropy']) * 1e6:.1f} µs")


if __name__ == "__main__":
    main()
