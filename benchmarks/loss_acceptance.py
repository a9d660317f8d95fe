"""Acceptance figures of the fused losses on CPU (issue 2): forward + backward time against
torch eager, torch.compile and one copy of the logits, and peak extra memory (each case in a
fresh process, VmHWM − VmRSS).

Each round times every case once, for each loss an untimed copy of the logits, a timed
one, ncfast, then its peers (the untimed copy first: the first run after torch eager has freed
its large buffers was seen up to 1.5× slower, whatever it runs); a ratio is the
median over rounds of the ratio within a round, so that a slow spell of a shared machine
(seconds long) weighs on both sides of a ratio alike.

    python benchmarks/loss_acceptance.py [--rows 4096] [--classes 32000] [--repeat 11]
"""

import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import ncfast  # noqa: E402
from bench_losses import _eager_focal, _eager_rescaled_mse  # noqa: E402

CASES = {
    "ncfast_ce": ncfast.cross_entropy,
    "ncfast_ce_inplace": lambda z, y: ncfast.cross_entropy(z, y, inplace_backward=True),
    "ncfast_focal": lambda z, y: ncfast.focal_loss(z, y, gamma=3.0),
    "ncfast_mse": lambda z, y: ncfast.rescaled_mse(z, y, kappa=1.0, beta=15.0),
    "eager_ce": F.cross_entropy,
    "eager_focal": _eager_focal,
    "eager_mse": _eager_rescaled_mse,
}


def _status_mib(key):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key):
                return int(line.split()[1]) / 1024
    raise KeyError(key)


def peak_memory(case, rows, classes):
    """In a child process: peak RSS growth of one forward + backward (gradient by autograd.grad)."""
    fn = CASES[case]
    warm = torch.randn(64, 300, requires_grad=True)
    torch.autograd.grad(fn(warm, torch.randint(0, 300, (64,))), warm)
    ncfast.losses.release_workspace()
    logits = torch.randn(rows, classes, requires_grad=True)
    target = torch.randint(0, classes, (rows,))
    base = _status_mib("VmRSS")
    torch.autograd.grad(fn(logits, target), logits)
    print(_status_mib("VmHWM") - base)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--classes", type=int, default=32000)
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--child", choices=list(CASES))
    args = parser.parse_args()
    if args.child:
        return peak_memory(args.child, args.rows, args.classes)

    torch.manual_seed(0)
    logits = torch.randn(args.rows, args.classes)
    target = torch.randint(0, args.classes, (args.rows,))
    copy = torch.empty_like(logits)
    compiled_ce = torch.compile(F.cross_entropy)

    def step(fn, inplace=False):
        def run():
            z = (logits.clone() if inplace else logits.detach()).requires_grad_(True)
            fn(z, target).backward()
        return run

    timed = {}
    for loss in ["ce", "focal", "mse"]:
        timed[f"settle_{loss}"] = lambda: copy.copy_(logits)
        timed[f"copy_{loss}"] = lambda: copy.copy_(logits)
        timed[f"ncfast_{loss}"] = step(CASES[f"ncfast_{loss}"])
        timed[f"eager_{loss}"] = step(CASES[f"eager_{loss}"])
        if loss == "ce":
            timed["compile_ce"] = step(compiled_ce)
    timed["ncfast_ce_inplace"] = step(CASES["ncfast_ce_inplace"], inplace=True)
    for run in timed.values():
        run()  # warm-up, compilation
    times = {name: [] for name in timed}
    for _ in range(args.repeat):
        for name, run in timed.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)

    def median_of(values):
        return sorted(values)[len(values) // 2]

    def ratio(a, b):
        return median_of([x / y for x, y in zip(times[a], times[b])])

    median = {name: median_of(t) for name, t in times.items()}
    print(f"fp32, N={args.rows}, K={args.classes}, forward + backward, {torch.get_num_threads()} threads, "
          f"{args.repeat} rounds")
    for name, value in median.items():
        if name.startswith("settle"):
            continue
        print(f"  {name:18s} median {value:.4f} s   min {min(times[name]):.4f} s")
    for loss in ["ce", "focal", "mse"]:
        ours = f"ncfast_{loss}"
        line = f"  {loss:6s} eager/ncfast {ratio(f'eager_{loss}', ours):5.1f}x   ncfast/copy {ratio(ours, f'copy_{loss}'):.2f}"
        if loss == "ce":
            line += f"   compile/ncfast {ratio('compile_ce', ours):.1f}x"
        print(line)
    print(f"peak extra memory (one N×K buffer = {args.rows * args.classes * 4 / 2**20:.0f} MiB):")
    for case in CASES:
        out = subprocess.run([sys.executable, __file__, "--child", case, "--rows", str(args.rows),
                              "--classes", str(args.classes)], capture_output=True, text=True, check=True)
        print(f"  {case:18s} {float(out.stdout.split()[-1]):7.0f} MiB")


if __name__ == "__main__":
    main()
