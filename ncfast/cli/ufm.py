"""``ncfast ufm``: solve the unconstrained feature model, print the gap to the closed-form
optimum, write the convergence curves (CSV, and a figure with matplotlib)."""

from __future__ import annotations

import os

from ..figures import figures_available, write_curves
from ..progress import progress_bar
from ..training.config import check_output_folder
from ..ufm import HISTORY_KEYS, METHODS, solve
from .common import add_loss_arguments, figures_note, loss_overrides, user_errors

CLI_HELP = "solve the unconstrained feature model; print the gap to the closed-form optimum, plot convergence"


def add_arguments(parser) -> None:
    parser.add_argument("--classes", type=int, default=10, help="K (default 10)")
    parser.add_argument("--per-class", type=int, default=10, help="n samples per class (default 10)")
    parser.add_argument("--dim", type=int, default=20, help="feature dimension d (default 20)")
    parser.add_argument("--lambda-w", type=float, default=5e-4)
    parser.add_argument("--lambda-h", type=float, default=5e-5)
    parser.add_argument("--lambda-b", type=float, default=0.0)
    parser.add_argument("--no-bias", action="store_true", help="fix b = 0 (Wang et al. 2022's CE problem)")
    parser.add_argument("--method", choices=METHODS, default="lbfgs",
                        help="lbfgs (default) or gd: gradient descent with backtracking (Wang et al. 2022, §3)")
    parser.add_argument("--max-iters", type=int, default=None)
    parser.add_argument("--tol", type=float, default=1e-10, help="gradient-norm tolerance")
    parser.add_argument("--seed", type=int, default=0)
    add_loss_arguments(parser, "mse")
    parser.add_argument("--out", default="ncfast_out", help="output folder for ufm_<loss>.csv (and .png)")


def run(args) -> int:
    loss_kwargs = {name: value for name, value in loss_overrides(args).items() if value is not None}
    max_iters = args.max_iters if args.max_iters is not None else (20000 if args.method == "gd" else 1000)
    with user_errors():
        check_output_folder("out", args.out)
        bar = progress_bar(max_iters, "ufm")

        def progress(iteration, value, grad_norm):
            bar.update(1)
            bar.set_postfix_str(f"F={value:.10g} |grad|={grad_norm:.2e}", refresh=False)

        try:
            result = solve(args.classes, args.per_class, args.dim, args.loss, args.lambda_w, args.lambda_h,
                           args.lambda_b, not args.no_bias, args.method, args.seed, max_iters, args.tol,
                           progress=progress, **loss_kwargs)
        finally:
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
    csv = os.path.join(args.out, f"ufm_{args.loss}.csv")
    with open(csv, "w") as handle:
        handle.write("iteration," + ",".join(HISTORY_KEYS) + "\n")
        for i in range(len(history["objective"])):
            handle.write(f"{i}," + ",".join(f"{history[k][i]:.17g}" for k in HISTORY_KEYS) + "\n")
    written = [csv]
    if figures_available():
        iterations = list(range(len(history["objective"])))
        panels = {}
        if result.optimum is not None:
            panels["gap F - F*"] = {args.loss: (iterations, [f - result.optimum for f in history["objective"]])}
        panels.update({key.upper(): {args.loss: (iterations, history[key])} for key in ("nc1", "nc2", "nc3")})
        written.append(write_curves(os.path.join(args.out, f"ufm_{args.loss}.png"), panels, "iteration",
                                    title=f"UFM, {args.loss}, {args.method}"))
    print(f"wrote {' and '.join(written)}")
    note = figures_note()
    if note:
        print(note)
    return 0
