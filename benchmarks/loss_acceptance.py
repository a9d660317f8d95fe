"""Acceptance table of the fused losses on CPU: forward + backward time of ncfast against torch
eager, torch.compile of the same torch formula, a clone of the logits (a fresh buffer, as the
fused loss's gradient is) and a copy of them into a preallocated buffer (the stricter floor), at
every shape of
``bench_losses.SHAPES`` plus the per-call case (128, 10) with one thread; fp32 and bf16.
Prints one markdown table.

Timing: each round times, for each loss, an untimed copy (the first run after torch eager
has freed its large buffers was seen up to 1.5× slower, whatever it runs), a timed copy, a
timed clone, ncfast, eager and compile, back to back. A time is the median over rounds; a ratio is the
median over rounds of the ratio within a round, so that a slow spell of a shared machine
(seconds long) weighs on both sides alike. torch.compile is compiled per shape and dtype
(``dynamic=False``, a fresh compile cache for each). With ``--memory``, the peak extra memory
of ncfast (and of ``inplace_backward=True``) is measured in fresh processes (VmHWM − VmRSS
before the call, the peak first reset to the current RSS; gradient by ``.backward()`` into
``.grad``, as a user gets it) and given in units of one logits buffer.

    python benchmarks/loss_acceptance.py                        # the whole table (long)
    python benchmarks/loss_acceptance.py --shapes 4096x32000 8x19x256x256 --dtypes float32 \\
        --losses cross_entropy --rounds 5 --memory

The targets column marks the rows that meet them: ncfast/clone ≤ 1.5, compile/ncfast ≥ 1.25,
eager/ncfast ≥ 3 (per call: eager/ncfast ≥ 1).
"""

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_losses import (DTYPES, LOSSES, PER_CALL_SHAPE, SHAPES, logits_copy,  # noqa: E402
                          loss_step, make_inputs, ncfast_loss, parse_shape)
from process_memory import child_env, reset_peak, status_bytes  # noqa: E402

PEERS = ["ncfast", "torch_eager", "torch_compile"]
SHORT = {"cross_entropy": "CE", "focal": "focal γ=3", "rescaled_mse": "MSE κ=1 β=15"}
# Calls per timed sample: one call of the per-call case is tens of microseconds.
PER_CALL_CALLS = 200


def _median(values):
    return sorted(values)[len(values) // 2]


def _ratio(numerator, denominator):
    """Median over rounds of the ratio within a round."""
    return _median([x / y for x, y in zip(numerator, denominator)])


def measure_shape(shape, dtype, losses, rounds, calls=1):
    """{(loss, peer): [seconds per call, one per round]} and the copy's, interleaved."""
    torch._dynamo.reset()
    logits, target = make_inputs(shape, dtype)
    runs = {"copy": logits_copy(logits), "clone": logits.clone}
    for loss in losses:
        for peer in PEERS:
            runs[(loss, peer)] = loss_step(loss, peer, logits, target)
    for run in runs.values():
        run()  # warm-up, compilation
    # The floors are timed once per loss, next to that loss's peers.
    floors = ["copy", "clone"]
    times = {key: [] for loss in losses for key in [(f, loss) for f in floors] + [(loss, peer) for peer in PEERS]}
    for _ in range(rounds):
        for loss in losses:
            runs["copy"]()  # untimed: settles the machine after the previous peer
            for key, run in [((f, loss), runs[f]) for f in floors] + [((loss, p), runs[(loss, p)]) for p in PEERS]:
                start = time.perf_counter()
                for _ in range(calls):
                    run()
                times[key].append((time.perf_counter() - start) / calls)
    return times


def child_peak_memory(loss, implementation, shape, dtype):
    """In a fresh process: peak RSS growth of one forward + backward of an ncfast
    implementation, in logits buffers (``null`` where it rejects the layout). The leaf is made
    before the measurement: for ``ncfast_inplace`` its copy of the logits is the caller's."""
    inplace = implementation == "ncfast_inplace"
    function = ncfast_loss(loss, inplace_backward=inplace)
    warm_logits, warm_target = make_inputs("64x300", dtype)
    function(warm_logits.clone().requires_grad_(True), warm_target).backward()  # loads the code
    logits, target = make_inputs(shape, dtype)
    leaf = (logits.clone() if inplace else logits).requires_grad_(True)
    reset_peak()
    before = status_bytes("VmRSS")
    try:
        function(leaf, target).backward()
    except ValueError:  # an option this layout does not offer (in place on (N, K, d1, ...))
        print(json.dumps(None))
        return
    growth = status_bytes("VmHWM") - before
    print(json.dumps(growth / (logits.numel() * logits.element_size())))


def peak_memory(loss, implementation, shape, dtype):
    command = [sys.executable, os.path.abspath(__file__), "--child", loss, implementation, shape, dtype]
    out = subprocess.run(command, capture_output=True, text=True, check=True, env=child_env()).stdout
    return json.loads(out.splitlines()[-1])


def _format_seconds(seconds):
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} µs"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=SHAPES + [PER_CALL_SHAPE],
                        help=f"logit shapes, e.g. 4096x32000 8x19x256x256 ({PER_CALL_SHAPE} runs with one thread)")
    parser.add_argument("--losses", nargs="+", default=LOSSES, choices=LOSSES)
    parser.add_argument("--dtypes", nargs="+", default=DTYPES, choices=DTYPES)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--memory", action="store_true", help="also peak extra memory (fresh processes)")
    parser.add_argument("--child", nargs=4, metavar=("LOSS", "IMPLEMENTATION", "SHAPE", "DTYPE"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_peak_memory(*args.child)

    threads = torch.get_num_threads()
    print(f"forward + backward, {threads} threads ({PER_CALL_SHAPE}: 1 thread, {PER_CALL_CALLS} calls per sample), "
          f"{args.rounds} rounds; times are medians, ratios medians of per-round ratios\n")
    header = ("| logits | dtype | loss | ncfast | eager | compile | clone | copy | ncfast/clone | ncfast/copy "
              "| compile/ncfast | eager/ncfast | targets |")
    if args.memory:
        header += " peak extra (logits buffers) ncfast / in place |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for shape in args.shapes:
        parse_shape(shape)  # a malformed shape fails here, before any timing
        per_call = shape == PER_CALL_SHAPE
        for dtype in args.dtypes:
            torch.set_num_threads(1 if per_call else threads)
            times = measure_shape(shape, dtype, args.losses, args.rounds, PER_CALL_CALLS if per_call else 1)
            torch.set_num_threads(threads)
            for loss in args.losses:
                copy, clone = times[("copy", loss)], times[("clone", loss)]
                ours = times[(loss, "ncfast")]
                eager, compiled = times[(loss, "torch_eager")], times[(loss, "torch_compile")]
                over_clone, over_copy = _ratio(ours, clone), _ratio(ours, copy)
                ratios = _ratio(compiled, ours), _ratio(eager, ours)
                meets = ratios[1] >= 1 if per_call else over_clone <= 1.5 and ratios[0] >= 1.25 and ratios[1] >= 3
                floors = "— | —" if per_call else f"{over_clone:.2f} | {over_copy:.2f}"
                row = (f"| ({shape.replace('x', ', ')}) | {dtype} | {SHORT[loss]} | {_format_seconds(_median(ours))} | "
                       f"{_format_seconds(_median(eager))} | {_format_seconds(_median(compiled))} | "
                       f"{_format_seconds(_median(clone))} | {_format_seconds(_median(copy))} | {floors} | "
                       f"{ratios[0]:.2f} | {ratios[1]:.2f} | {'met' if meets else '**missed**'} |")
                if args.memory and per_call:
                    row += " — |"  # a few kB: below the page granularity of VmHWM
                elif args.memory:
                    memory = [peak_memory(loss, peer, shape, dtype) for peer in ("ncfast", "ncfast_inplace")]
                    row += " " + " / ".join("n/a" if m is None else f"{m:.2f}" for m in memory) + " |"
                print(row, flush=True)


if __name__ == "__main__":
    main()
