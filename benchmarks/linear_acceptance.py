"""Acceptance figures of the fused linear + loss on CPU (issue 4): peak memory growth and
time of ``linear_cross_entropy`` forward + backward against the three GEMMs it needs.

Run as a script (not an asv benchmark: one shape, minutes of runtime)::

    python benchmarks/linear_acceptance.py [--rows 65536 --dim 256 --classes 16384 --repeat 3]

Memory: each measurement runs in a fresh subprocess; growth = VmHWM after the call − VmRSS
before it (code warmed up at a tiny shape, inputs allocated). Time: min (and median) over ``--repeat`` runs, the
fused call and the GEMMs alternated in the same process so that load from other processes
hits both alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _inputs(rows, dim, classes):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(classes, dim, generator=gen) / dim**0.5
    bias = torch.zeros(classes)
    target = torch.randint(0, classes, (rows,), generator=gen)
    return features, weight, bias, target


def _fused(features, weight, bias, target):
    import ncfast

    leaves = [t.requires_grad_(True) for t in (features, weight, bias)]
    value = ncfast.linear_cross_entropy(*leaves, target)
    value.backward()
    return value


def _gemms(features, weight, chunk):
    """The three GEMMs of the fused call, at the same chunking (no loss kernel, no bias)."""
    features, weight = features.detach(), weight.detach()
    buffer = torch.empty(chunk, weight.shape[0])
    d_features = torch.empty_like(features)
    d_weight = torch.zeros_like(weight)
    for start in range(0, features.shape[0], chunk):
        h = features[start:start + chunk]
        z = buffer[: h.shape[0]]
        torch.mm(h, weight.t(), out=z)
        torch.mm(z, weight, out=d_features[start:start + chunk])
        d_weight.addmm_(z.t(), h)


def _gemms_full(features, weight):
    """The same three GEMMs at full shape (N, K) logits."""
    features, weight = features.detach(), weight.detach()
    logits = features @ weight.t()
    logits @ weight
    logits.t() @ features


def _warm_up(kind, dim, classes):
    """Loads the code (MKL kernels, the extension, torch.library dispatch) at a tiny shape so
    that its pages do not count as the call's memory."""
    _run(kind, *_inputs(64, dim, classes), 64)


def _torch_eager(features, weight, bias, target):
    """The unfused computation: full logits, ``F.cross_entropy``, autograd."""
    leaves = [t.requires_grad_(True) for t in (features, weight, bias)]
    logits = torch.nn.functional.linear(*leaves)
    torch.nn.functional.cross_entropy(logits, target).backward()


def _run(kind, features, weight, bias, target, chunk):
    if kind == "fused":
        _fused(features, weight, bias, target)
    elif kind == "torch_eager":
        _torch_eager(features, weight, bias, target)
    elif kind == "gemms_chunked":
        _gemms(features, weight, chunk)
    else:
        _gemms_full(features, weight)


def _child(kind, rows, dim, classes):
    _warm_up(kind, dim, classes)
    features, weight, bias, target = _inputs(rows, dim, classes)
    before = _status("VmRSS")
    start = time.perf_counter()
    _run(kind, features, weight, bias, target, rows)
    seconds = time.perf_counter() - start
    print(json.dumps({"growth": _status("VmHWM") - before, "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=65536)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=16384)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--torch", action="store_true",
                        help="also torch eager (full logits: needs several times N·K·4 bytes)")
    parser.add_argument("--child", choices=["fused", "gemms_full", "torch_eager"])
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.rows, args.dim, args.classes)
        return

    from ncfast import linear

    shape = ["--rows", str(args.rows), "--dim", str(args.dim), "--classes", str(args.classes)]
    peers = ("fused", "gemms_full") + (("torch_eager",) if args.torch else ())
    memory = {}
    for kind in peers:
        out = subprocess.run([sys.executable, __file__, "--child", kind, *shape], check=True,
                             capture_output=True, text=True).stdout
        memory[kind] = json.loads(out.splitlines()[-1])
    logits_bytes = args.rows * args.classes * 4
    print(f"N={args.rows} d={args.dim} K={args.classes} fp32, threads={torch.get_num_threads()}, "
          f"full logits would be {logits_bytes / 2**30:.2f} GiB")
    for kind, m in memory.items():
        print(f"  peak RSS growth {kind:10s}: {m['growth'] / 2**20:8.1f} MiB  (first call {m['seconds']:.2f} s)")

    features, weight, bias, target = _inputs(args.rows, args.dim, args.classes)
    chunk = linear.chunk_rows(args.rows, args.classes, torch.float32)
    for kind in peers:
        _warm_up(kind, args.dim, args.classes)
    times = {kind: [] for kind in ("fused", "gemms_chunked") + peers[1:]}
    for _ in range(args.repeat):
        for kind in times:
            leaves = (features.detach().clone(), weight.detach().clone(), bias.clone())
            start = time.perf_counter()
            _run(kind, *leaves, target, chunk)
            times[kind].append(time.perf_counter() - start)
    best = {kind: min(t) for kind, t in times.items()}
    flops = 6 * args.rows * args.classes * args.dim
    print(f"  chunk rows = {chunk} ({chunk * args.classes * 4 / 2**20:.0f} MiB of logits)")
    for kind, t in times.items():
        print(f"  {kind:14s}: min {best[kind]:7.2f} s  ({flops / best[kind] / 1e9:6.1f} GFLOP/s of 6NKd)  "
              f"runs {[round(x, 2) for x in t]}")
    median = {kind: statistics.median(t) for kind, t in times.items()}
    for kind in times:
        if kind != "fused":
            print(f"  fused / {kind:14s} = {best['fused'] / best[kind]:.3f} (min)  "
                  f"{median['fused'] / median[kind]:.3f} (median)")


if __name__ == "__main__":
    main()
