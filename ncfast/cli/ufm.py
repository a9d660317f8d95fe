"""``ncfast ufm``: solve the unconstrained feature model, print the gap to the closed-form
optimum, write the convergence curves."""

from __future__ import annotations

import os

from ..plot import write_line_plot
from ..progress import Progress
from ..ufm import HISTORY_KEYS, METHODS, UFM_LOSSES, solve
from .common import CLIError

CLI_HELP = "solve the unconstrained feature model; print the gap to the closed-form optimum, plot convergence"


def add_arguments(parser) -> None:
    parser.add_argument("--classes", type=int, default=10, help="K (default 10)")
    parser.add_argument("--per-class", type=int, default=10, help="n samples per class (default 10)")
    parser.add_argument("--dim", type=int, default=20, help="feature dimension d (default 20)")
    parser.add_argument("--loss", choices=UFM_LOSSES, default="mse")
    parser.add_argument("--lambda-w", type=float, default=5e-4)
    parser.add_argument("--lambda-h", type=float, default=5e-5)
    parser.add_argument("--lambda-b", type=float, default=0.0)
    parser.add_argument("--no-bias", action="store_true", help="fix b = 0 (seed 004's CE problem)")
    parser.add_argument("--method", choices=METHODS, default="lbfgs",
                        help="lbfgs (default) or gd: seed 004 §3's gradient descent with backtracking")
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--tol", type=float, default=1e-10, help="gradient-norm tolerance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gamma", type=float, help="focal γ (default 3)")
    parser.add_argument("--label-smoothing", type=float, help="ls α (default 0.1)")
    parser.add_argument("--kappa", type=float, help="rescaled MSE κ (default 1)")
    parser.add_argument("--beta", type=float, help="rescaled MSE β (default 1)")
    parser.add_argument("--out", default="ncfast_out", help="output folder for ufm_<loss>.png/.csv")


def run(args) -> int:
    names = {"focal": ("gamma",), "ls": ("label_smoothing",), "mse": ("kappa", "beta"), "ce": ()}[args.loss]
    for other in ("gamma", "label_smoothing", "kappa", "beta"):
        if getattr(args, other) is not None and other not in names:
            raise CLIError(f"--{other.replace('_', '-')} does not apply to --loss {args.loss}")
    loss_kwargs = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    max_iters = args.max_iters if args.max_iters is not None else (20000 if args.method == "gd" else 1000)
    bar = Progress(max_iters, "ufm")
    try:
        result = solve(args.classes, args.per_class, args.dim, args.loss, args.lambda_w, args.lambda_h,
                       args.lambda_b, not args.no_bias, args.method, args.seed, max_iters, args.tol,
                       progress=lambda i, f, g: bar.update(i, f"F={f:.10g} |grad|={g:.2e}"), **loss_kwargs)
    except ValueError as error:
        raise CLIError(str(error)) from None
    bar.close()
    history = result.history
    print(f"UFM K={args.classes} n={args.per_class} d={args.dim} loss={args.loss} "
          f"lambda_W={args.lambda_w:g} lambda_H={args.lambda_h:g} lambda_b={args.lambda_b:g} "
          f"bias={not args.no_bias} method={args.method}")
    print(f"iterations     {result.iterations} ({'converged' if result.converged else 'iteration cap'})")
    print(f"objective      {result.objective:.15g}")
    if result.optimum is None:
        print("optimum        (no closed form for this problem)")
    else:
        print(f"optimum        {result.optimum:.15g}")
        print(f"gap            {result.gap:.3e} (relative {result.relative_gap:.3e})")
    for key in ("grad_norm", "nc1", "nc2", "nc3"):
        print(f"{key:<14} {history[key][-1]:.3e}")
    os.makedirs(args.out, exist_ok=True)
    series = {}
    if result.optimum is not None:
        series["gap"] = [f - result.optimum for f in history["objective"]]
    series.update({key: history[key] for key in ("nc1", "nc2", "nc3")})
    png = os.path.join(args.out, f"ufm_{args.loss}.png")
    write_line_plot(png, series, title=f"ufm {args.loss} {args.method}: gap and nc vs iteration",
                    xlabel="iteration")
    csv = os.path.join(args.out, f"ufm_{args.loss}.csv")
    with open(csv, "w") as handle:
        handle.write("iteration," + ",".join(HISTORY_KEYS) + "\n")
        for i in range(len(history["objective"])):
            handle.write(f"{i}," + ",".join(f"{history[k][i]:.17g}" for k in HISTORY_KEYS) + "\n")
    print(f"wrote {png} and {csv}")
    return 0
