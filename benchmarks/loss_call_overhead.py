"""Per-call cost of the fused loss at a small shape: ``ncfast.cross_entropy`` against
``F.cross_entropy``, forward + backward, one thread, as the median of paired rounds.

    python benchmarks/loss_call_overhead.py [--rows 128] [--classes 10] [--rounds 41]
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
        loss_fn(x, target).backward()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logits = torch.randn(args.rows, args.classes)
    target = torch.randint(0, args.classes, (args.rows,))
    peers = {"ncfast": ncfast.cross_entropy, "torch": F.cross_entropy}
    for fn in peers.values():  # warm-up
        _step_time(fn, logits, target, args.repeats)
    times = {name: [] for name in peers}
    for _ in range(args.rounds):
        for name, fn in peers.items():
            times[name].append(_step_time(fn, logits, target, args.repeats))
    ratios = [a / b for a, b in zip(times["ncfast"], times["torch"])]
    for name, samples in times.items():
        print(f"{name:>7}: {statistics.median(samples) * 1e6:7.1f} µs per fwd+bwd")
    print(f"ncfast / torch: {statistics.median(ratios):.2f} (median of {args.rounds} paired rounds)")


if __name__ == "__main__":
    main()
