"""``python -m benchmarks.continual``: does LLaCA reduce forgetting? Every method on a sequence of
tasks, several seeds, the accuracy matrices, Avg.ACC / Forgetting / New.ACC (mean and std), JSON,
and a plot of Forgetting against New.ACC (one point per method and setting).

    python -m benchmarks.continual                    # permuted digits, 3 seeds, with the sweep
    python -m benchmarks.continual --quick --out /tmp/c   # CI size: checks that it runs

Task families: ``digits`` (permuted scikit-learn digits, a small MLP; see digits.py). The
instruction-tuned small language model family of the issue is not written yet.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import digits, metrics
from .methods import methods

RESULTS = Path(__file__).resolve().parents[1] / "results" / "continual"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="digits", choices=["digits"])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=5)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps per task")
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--no-sweep", action="store_true", help="only the baselines and the presets")
    p.add_argument("--backend", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny run for the tests")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def plot(summary: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for row in summary:
        is_sweep = "scale=" in row["method"]
        ax.errorbar(100 * row["forgetting"], 100 * row["new_acc"],
                    xerr=100 * row["forgetting_std"], yerr=100 * row["new_acc_std"],
                    fmt="o" if not is_sweep else "s", ms=6 if not is_sweep else 4, capsize=2,
                    alpha=1.0 if not is_sweep else 0.7, label=row["method"])
    ax.set_xlabel("Forgetting (%)  (lower is more stable)")
    ax.set_ylabel("New.ACC (%)  (higher is more plastic)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.quick:
        args.seeds, args.tasks, args.steps, args.width = 2, 3, 20, 32
    out = args.out or RESULTS / args.family
    out.mkdir(parents=True, exist_ok=True)
    plan = methods(args.lr, args.backend, sweep=not args.no_sweep)
    runs: dict[str, list] = {name: [] for name, _, _ in plan}
    total = len(plan) * args.seeds * args.tasks * args.steps
    with tqdm(total=total, unit="step", desc=args.family, disable=args.no_progress,
              file=sys.stderr, mininterval=0.5) as progress:
        for seed in range(args.seeds):
            for name, _, factory in plan:
                runs[name].append(digits.run(name, factory, seed, args.tasks, args.steps,
                                             args.width, progress))
    summary = []
    for name, settings, _ in plan:
        row = {"method": name, "settings": settings, **metrics.summarize(runs[name])}
        row["accuracy_matrices"] = [r.accuracy for r in runs[name]]
        summary.append(row)
    data = {
        "family": args.family,
        "protocol": f"permuted digits, {args.tasks} tasks x {args.steps} steps, MLP width "
                    f"{args.width}, lr {args.lr}, batch 64, seeds 0..{args.seeds - 1}",
        "command": " ".join(["python -m benchmarks.continual", *(argv if argv is not None else sys.argv[1:])]),
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "threads": torch.get_num_threads(),
                        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
        "results": summary,
    }
    (out / "results.json").write_text(json.dumps(data, indent=1))
    plot(summary, f"{args.family}: {args.tasks} tasks, {args.seeds} seeds", out / "forgetting_vs_new_acc.png")
    print(f"\n{data['protocol']}")
    header = f"{'method':<38}{'Avg.ACC':>15}{'Forgetting':>15}{'New.ACC':>15}"
    print(header)
    print("-" * len(header))
    for row in summary:
        cells = "".join(f"{100 * row[m]:>8.1f} ±{100 * row[m + '_std']:4.1f}" for m in metrics.METRICS)
        print(f"{row['method']:<38}{cells}")
    print(f"wrote {out / 'results.json'} and {out / 'forgetting_vs_new_acc.png'}")
    return out


def main(argv: list[str] | None = None) -> None:
    run(argv)
