"""Acceptance table of the fused linear + loss on CPU: forward + backward time and peak extra
memory of ``ncfast.linear_cross_entropy`` against the three bare GEMMs it needs and torch's
own ``F.linear_cross_entropy`` (chunked: ``options=torch.nn.LinearCrossEntropyOptions()``).
Prints one markdown table.

    python benchmarks/linear_acceptance.py                      # N=8192 d=256 K=32000, N=65536 d=256 K=16384
    python benchmarks/linear_acceptance.py --shapes 8192x256x32000 --chunk-rows 128 256 512 1024 2048

Peers, all fp32 with a bias: ``ncfast`` (its default chunking, or ``ncfast@R`` at R rows per
chunk with ``--chunk-rows``), ``torch_chunked``, ``torch_eager`` (full logits, with
``--torch-eager``: several N×K buffers), and ``gemms``, the floor: logits H Wᵀ, dH = G W and
dW = Gᵀ H into preallocated outputs, in blocks of at most 8192 rows (no loss, no bias, no
allocation; the floor needs no N×K buffer, and at ≥ 8192 rows the blocking costs nothing), on
``torch.mm`` (MKL for fp32 CPU, its AVX2 code on AMD). ``gemms_onednn`` is the same three
products on oneDNN's AVX-512 inner product (:func:`ncfast._matmul.mm_t`, which ncfast's fp32 CPU
path uses for the logits and dH), the faster floor: it has no ``out=``, so each block's products
are fresh tensors, dH is copied into place and dW summed with an add.

Time: every round runs each peer once, back to back; a time is the median over rounds, a ratio
the median over rounds of the ratio to the GEMMs within a round (a slow spell of a shared
machine weighs on both sides). Memory: each peer in a fresh process, growth = VmHWM after one
forward + backward − VmRSS before it (code warmed up at a tiny shape, inputs allocated, the
peak reset to the current RSS just before the call), the median over three processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from process_memory import child_env, reset_peak, status_bytes  # noqa: E402

#: The floor's GEMMs run in blocks of at most this many rows (see the module docstring).
GEMM_BLOCK_ROWS = 8192


def _inputs(rows, dim, classes):
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(rows, dim, generator=gen)
    weight = torch.randn(classes, dim, generator=gen) / dim**0.5
    bias = torch.zeros(classes)
    target = torch.randint(0, classes, (rows,), generator=gen)
    return features, weight, bias, target


def _peer(name, features, weight, bias, target):
    """A closure running one forward + backward of peer ``name`` on fresh leaves."""
    if name == "gemms":
        block = min(GEMM_BLOCK_ROWS, features.shape[0])
        logits = torch.empty(block, weight.shape[0])
        d_features, d_weight = torch.empty_like(features), torch.zeros_like(weight)

        def gemms():
            for start in range(0, features.shape[0], block):
                h = features[start:start + block]
                z = logits[: h.shape[0]]
                torch.mm(h, weight.t(), out=z)
                torch.mm(z, weight, out=d_features[start:start + block])
                d_weight.addmm_(z.t(), h)
        return gemms
    if name == "gemms_onednn":
        from ncfast._matmul import mm, mm_t

        block = min(GEMM_BLOCK_ROWS, features.shape[0])
        d_features, d_weight = torch.empty_like(features), torch.zeros_like(weight)

        def gemms_onednn():
            for start in range(0, features.shape[0], block):
                h = features[start:start + block]
                z = mm_t(h, weight)
                d_features[start:start + block] = mm(z, weight)
                d_weight.add_(mm_t(z.t(), h.t()))
        return gemms_onednn

    def step():
        h, w, b = (t.detach().requires_grad_(True) for t in (features, weight, bias))
        if name.startswith("ncfast"):
            import ncfast
            from ncfast import linear

            # ncfast@R: exactly R rows per chunk (R bytes-worth of chunk_memory is only a ceiling).
            rows = int(name.split("@")[1]) if "@" in name else None
            preferred, linear.GEMM_ROWS = linear.GEMM_ROWS, rows or linear.GEMM_ROWS
            try:
                value = ncfast.linear_cross_entropy(h, w, b, target, **({"chunk_memory": rows * w.shape[0] * 4}
                                                                        if rows else {}))
            finally:
                linear.GEMM_ROWS = preferred
        elif name == "torch_chunked":
            value = F.linear_cross_entropy(h, w, target, linear_bias=b, options=torch.nn.LinearCrossEntropyOptions())
        else:
            value = F.cross_entropy(F.linear(h, w, b), target)
        value.backward()
    return step


def child(name, rows, dim, classes):
    """In a fresh process: peak RSS growth (bytes) of one forward + backward of ``name``."""
    _peer(name, *_inputs(64, dim, classes))()  # loads the code
    inputs = _inputs(rows, dim, classes)
    run = _peer(name, *inputs)
    reset_peak()
    before = status_bytes("VmRSS")
    run()
    print(json.dumps(status_bytes("VmHWM") - before))


def _median(values):
    return sorted(values)[len(values) // 2]


def measure(shape, peers, rounds):
    """{peer: (median seconds, median ratios to the GEMMs on torch.mm and on oneDNN, peak extra bytes)}."""
    rows, dim, classes = shape
    memory = {}
    for name in peers:
        command = [sys.executable, os.path.abspath(__file__), "--child", name, f"{rows}x{dim}x{classes}"]
        runs = [subprocess.run(command, check=True, capture_output=True, text=True, env=child_env()) for _ in range(3)]
        peaks = [json.loads(run.stdout.splitlines()[-1]) for run in runs]
        memory[name] = _median(peaks)
    inputs = _inputs(rows, dim, classes)
    runs = {name: _peer(name, *inputs) for name in peers}
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in peers}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: (_median(t), _median([x / y for x, y in zip(t, times["gemms"])]),
                   _median([x / y for x, y in zip(t, times["gemms_onednn"])]), memory[name])
            for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8192x256x32000", "65536x256x16384"], help="N x d x K")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--chunk-rows", nargs="+", type=int, default=[],
                        help="also ncfast at these rows per chunk (the time/memory trade-off)")
    parser.add_argument("--torch-eager", action="store_true", help="also torch eager (full logits)")
    parser.add_argument("--child", nargs=2, metavar=("PEER", "SHAPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], *map(int, args.child[1].split("x")))
        return

    from ncfast import linear

    print(f"fp32 with bias, forward + backward, {torch.get_num_threads()} threads, {args.rounds} rounds; "
          f"times are medians, ratios medians of per-round ratios\n")
    print("| N × d × K | peer | rows per chunk | time | time / GEMMs (torch.mm) | time / GEMMs (oneDNN) "
          "| peak extra memory |")
    print("|---|---|---|---|---|---|---|")
    for text in args.shapes:
        shape = tuple(map(int, text.split("x")))
        rows, _, classes = shape
        peers = (["gemms", "gemms_onednn", "ncfast", "torch_chunked"] + [f"ncfast@{r}" for r in args.chunk_rows]
                 + (["torch_eager"] if args.torch_eager else []))
        default_chunk = linear.chunk_rows(rows, classes, torch.float32)
        for name, (seconds, ratio, ratio_onednn, growth) in measure(shape, peers, args.rounds).items():
            chunk = {"ncfast": default_chunk, "gemms": min(GEMM_BLOCK_ROWS, rows),
                     "gemms_onednn": min(GEMM_BLOCK_ROWS, rows)}.get(name, int(name.split("@")[1]) if "@" in name else "")
            print(f"| {' × '.join(map(str, shape))} | {name.split('@')[0]} | {chunk} | {seconds:.3f} s | "
                  f"{ratio:.3f} | {ratio_onednn:.3f} | {growth / 2**20:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
