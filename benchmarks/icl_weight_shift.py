"""ICL vs weight shifting for softmax regression: distance against the derived bound.

Li et al., "The Closeness of In-Context Learning and Weight Shifting for Softmax Regression",
arXiv:2304.13276.  For every context length n and step size eta, ``--trials`` seeded problems
(A ~ N(0, 1/d), x ~ N(0, 1/d), b = softmax(A x*)) get one gradient step on the weights (GD,
``x' = x - eta grad_x L``) and one on the context (the attention layer's in-context update,
``A' = A - eta grad_A L``); the distance ``||softmax(A' x) - softmax(A x')||`` is measured next
to the bounds D1 (data-dependent) and D2 (``eta/4 R^2 ||p - b||``) derived in
``cliplab.experiments.icl``.  Pure float64 arithmetic: seconds on one thread.

Usage: python benchmarks/icl_weight_shift.py [--quick] [--trials 64] [--d 8] [--out PATH]
           [--figure PATH | --no-figure]
Writes benchmarks/results/icl_weight_shift.json and docs/icl/icl_weight_shift.png, prints one
summary line and the two tables of docs/icl_weight_shifting.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("CLIPLAB_PROGRESS", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "icl_weight_shift.json"
FIGURE = HERE.parent / "docs" / "icl" / "icl_weight_shift.png"

CONTEXT_LENGTHS = (2, 4, 8, 16, 32, 64, 128, 256)
STEP_SIZES = (0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
FIXED_ETA, FIXED_N = 0.3, 16          # the slices drawn and tabled


def table(rows: list[dict], key: str) -> str:
    """Markdown table of the rows, one per value of ``key`` (``"n"`` or ``"eta"``)."""
    head = ("| n | eta | distance mean | distance max | bound D1 mean | bound D2 mean | max distance / D1 "
            "| max distance / D2 |\n|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        lines.append(f"| {r['n']} | {r['eta']:g} | {r['distance_mean']:.2e} | {r['distance_max']:.2e} "
                     f"| {r['bound_data_mean']:.2e} | {r['bound_r_mean']:.2e} | {r['ratio_max']:.3f} "
                     f"| {r['ratio_r_max']:.4f} |")
    return "\n".join(lines)


def figure(result: dict, out: Path) -> None:
    """Mean distance and mean bounds vs context length (eta fixed) and vs step size (n fixed);
    the worst trial's distance / bound vs context length (a bound holds per problem)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = result["rows"]
    by_n = [r for r in rows if r["eta"] == FIXED_ETA]
    by_eta = [r for r in rows if r["n"] == FIXED_N and r["eta"] > 0]
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.6))
    for ax, sel, key, label in ((axes[0], by_n, "n", "context length n"),
                                (axes[1], by_eta, "eta", "step size eta")):
        xs = [r[key] for r in sel]
        ax.plot(xs, [r["distance_mean"] for r in sel], "o-", color="C0", label="distance")
        ax.plot(xs, [r["bound_data_mean"] for r in sel], "s-", color="C3", label="bound D1")
        ax.plot(xs, [r["bound_r_mean"] for r in sel], "^-", color="C1", label="bound D2")
        ax.set_xscale("log", base=2 if key == "n" else 10)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("mean over problems")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_title(f"||p_icl - p_gd|| vs n (eta = {FIXED_ETA:g})", fontsize=10)
    axes[1].set_title(f"||p_icl - p_gd|| vs eta (n = {FIXED_N})", fontsize=10)
    axes[1].legend(fontsize=8, loc="upper left")
    xs = [r["n"] for r in by_n]
    axes[2].plot(xs, [r["ratio_max"] for r in by_n], "s-", color="C3", label="max distance / D1")
    axes[2].plot(xs, [r["ratio_r_max"] for r in by_n], "^-", color="C1", label="max distance / D2")
    axes[2].axhline(1.0, color="k", lw=1, ls="--")
    axes[2].set_xscale("log", base=2)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("context length n")
    axes[2].set_title(f"worst problem, eta = {FIXED_ETA:g} (bound = 1)", fontsize=10)
    axes[2].legend(fontsize=8, loc="lower left")
    axes[2].grid(True, which="major", alpha=0.3)
    fig.suptitle(f"one context step (ICL) vs one weight step (GD), softmax regression, d = {result['config']['d']}, "
                 f"{result['config']['trials']} problems per point", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72)
    plt.close(fig)
    Image.open(out).convert("RGB").quantize(colors=64, method=Image.MEDIANCUT).save(out, optimize=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 context lengths x 3 step sizes, 8 trials (tests)")
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--d", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    parser.add_argument("--no-figure", action="store_true")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from cliplab.experiments import run_icl_experiment

    if args.quick:
        ns, etas, trials = (2, FIXED_N, 64), (0.0, FIXED_ETA, 3.0), 8
    else:
        ns, etas, trials = CONTEXT_LENGTHS, STEP_SIZES, args.trials
    result = run_icl_experiment(ns, etas, d=args.d, trials=trials, seed=args.seed).to_dict()
    result["command"] = "python benchmarks/icl_weight_shift.py" + (" --quick" if args.quick else "")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if not args.no_figure:
        figure(result, args.figure)
    rows = result["rows"]
    print(table([r for r in rows if r["eta"] == FIXED_ETA], "n"))
    print()
    print(table([r for r in rows if r["n"] == FIXED_N], "eta"))
    worst = max(r["ratio_max"] for r in rows)
    print(f"icl_weight_shift: {len(rows)} rows x {trials} problems, within bound D1: {result['within_bound']}, "
          f"max distance / D1 = {worst:.3f}; wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["within_bound"] else 1)
