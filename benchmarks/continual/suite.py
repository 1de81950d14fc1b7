"""``python -m benchmarks.continual``: does LLaCA reduce forgetting? Every method on a sequence of
tasks, several seeds, the accuracy matrices, Avg.ACC / Forgetting / New.ACC (mean and std), JSON,
and a plot of Forgetting against New.ACC (one point per method and setting).

    python -m benchmarks.continual                    # both families, 3 seeds, with the sweeps
    python -m benchmarks.continual --family digits    # only permuted digits (about 4 minutes)
    python -m benchmarks.continual --quick --out /tmp/c   # CI size: checks that it runs
    python -m benchmarks.continual --methods "LLaCAAdamW coin-mean" --merge
                            # run one method and put its rows into the existing results

Task families (``--family``): ``digits`` (permuted scikit-learn digits, a small MLP; digits.py),
``lm`` (a tiny Llama from transformers, instruction-tuned on four generated tasks in sequence,
full fine-tuning and LoRA through peft; lm.py) and ``digits-lora`` (the digits tasks through
rank-128 LoRA factors of 4096-wide layers, the published recipe's tensor size and alpha regime;
digits_lora.py); ``all`` runs them all. Each setting writes into its own folder under
benchmarks/results/continual/ (digits, lm-full, lm-lora, digits-lora).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from . import digits, frontier, metrics
from .methods import methods

RESULTS = Path(__file__).resolve().parents[1] / "results" / "continual"  # committed
# Where a run writes unless --out names a folder: never the committed results, which a quick or
# partial run would overwrite (--out benchmarks/results/continual updates them).
DEFAULT_ROOT = Path("bench-results") / "continual"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.continual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", default="all",
                   choices=["digits", "lm", "lm-full", "lm-lora", "digits-lora", "all"],
                   help="lm runs lm-full and lm-lora")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=5, help="digits: number of tasks")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per task (default: digits 400, lm 300)")
    p.add_argument("--width", type=int, default=512, help="digits: MLP width")
    p.add_argument("--lr", type=float, default=None,
                   help="default: 1e-3 (digits, lm full fine-tuning), 3e-3 (lm LoRA)")
    p.add_argument("--no-sweep", action="store_true", help="only the baselines and the presets")
    p.add_argument("--backend", default="auto")
    p.add_argument("--quick", action="store_true", help="tiny run for the tests")
    p.add_argument("--out", type=Path, default=None,
                   help="results folder (default: bench-results/continual/ in the current folder; "
                        "name benchmarks/results/continual to update the committed results)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="run only the methods of these names (as in the results' 'method')")
    p.add_argument("--schedule", default="constant", choices=["constant", "cosine"],
                   help="digits-lora: the learning rate per task; cosine is the published "
                        "recipe's (a linear warm-up over --warmup of the steps, then cosine to 0)")
    p.add_argument("--warmup", type=float, default=0.03, help="the warm-up's share of a task's steps")
    p.add_argument("--frontier", action="store_true",
                   help="sweep a fixed EMA's weight and LLaCA's scale (norms sum and mean) "
                        "instead of the presets, into <family>/frontier/ (frontier.py)")
    p.add_argument("--ema-weights", nargs="+", type=float, default=None, metavar="W",
                   help="frontier: the fixed EMA's weights to sweep instead of its grid (to sample "
                        "between the grid's points, with --methods and --merge)")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of the other methods in an existing results.json of the "
                        "same protocol, replacing the rows of the methods run now")
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


# The language-model sweep is smaller than the digits one: each run trains a transformer.
LM_GRID = [(0.1, 0.01), (2.0, 0.03), (50.0, 0.01)]


def settings_of(args) -> list[dict]:
    """One entry per (family, mode): where it writes and how one run of a method is made."""
    out = []
    if args.family in ("digits", "all"):
        steps = args.steps or (20 if args.quick else 400)
        tasks, width = (3, 32) if args.quick else (args.tasks, args.width)
        lr = args.lr or 1e-3
        out.append(dict(
            name="digits", lr=lr, grid=None, steps=steps,
            protocol=f"permuted digits, {tasks} tasks x {steps} steps, MLP width {width}, lr {lr}, batch 64",
            tasks=tasks, prepare=lambda seed: None,
            # default arguments bind the values now: the lm branch below reuses these names
            run=lambda name, make, seed, base, progress, tasks=tasks, steps=steps, width=width:
                digits.run(name, make, seed, tasks, steps, width, progress)))
    if args.family in ("digits-lora", "all"):
        from . import digits_lora

        steps = args.steps or (5 if args.quick else 150)
        tasks, width, rank, pre_steps = (3, 64, 8, 5) if args.quick else (args.tasks, 4096, 128, 150)
        lr = args.lr or 2e-4
        schedule = ("" if args.schedule == "constant" else
                    f", {args.warmup:.0%} linear warm-up then cosine to 0 in each task")
        out.append(dict(
            name="digits-lora" + ("" if args.schedule == "constant" else f"-{args.schedule}-{steps}"),
            lr=lr, grid=[], steps=steps,
            protocol=(f"permuted digits, {tasks} tasks x {steps} steps, MLP 64-{width}-{width}-10 "
                      f"pre-trained {pre_steps} steps on its own permutation, hidden layers frozen "
                      f"with rank-{rank} LoRA (factors of {rank * width} elements), head trained, "
                      f"lr {lr}{schedule}, batch 64"),
            tasks=tasks,
            prepare=lambda seed, width=width, pre_steps=pre_steps: digits_lora.pretrain(seed, width, pre_steps),
            run=lambda name, make, seed, base, progress, tasks=tasks, steps=steps, width=width, rank=rank:
                digits_lora.run(name, make, base, tasks, steps, width, rank, progress,
                                args.schedule, args.warmup)))
    if args.family in ("lm", "lm-full", "lm-lora", "all"):
        from . import lm

        steps = args.steps or (10 if args.quick else 300)
        pre_steps, n_eval = (10, 8) if args.quick else (300, 100)
        modes = [args.family[3:]] if args.family in ("lm-full", "lm-lora") else ["full", "lora"]
        for mode in modes:
            lr = args.lr or (1e-3 if mode == "full" else 3e-3)
            out.append(dict(
                name=f"lm-{mode}", lr=lr, grid=LM_GRID, steps=steps,
                protocol=(f"tiny Llama (2 layers, hidden 64), char-level, pre-trained {pre_steps} "
                          f"steps on a copy task, then {', '.join(lm.TASKS)} x {steps} steps each, "
                          f"{'LoRA r=8 on all projections' if mode == 'lora' else 'full fine-tuning'}, "
                          f"lr {lr}, batch 32, exact match on {n_eval} held-out prompts per task"),
                tasks=len(lm.TASKS),
                prepare=lambda seed, pre_steps=pre_steps: lm.pretrain(seed, pre_steps, 32),
                run=lambda name, make, seed, base, progress, mode=mode, steps=steps, n_eval=n_eval:
                    lm.run(name, make, base, mode, steps, 32, n_eval, progress)))
    return out


def run(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    if args.quick:
        args.seeds = 2
    root = args.out or DEFAULT_ROOT
    settings = settings_of(args)
    if args.frontier:
        plans = {st["name"]: frontier.frontier_methods(st["name"], st["lr"], args.backend, args.quick,
                                                       recipe=args.schedule == "cosine",
                                                       ema_weights=args.ema_weights)
                 for st in settings}
    else:
        plans = {st["name"]: methods(st["lr"], args.backend, sweep=not args.no_sweep, grid=st["grid"])
                 for st in settings}
    if args.methods is not None:
        known = {name for plan in plans.values() for name, _, _ in plan}
        unknown = sorted(set(args.methods) - known)
        if unknown:
            raise SystemExit(f"unknown method(s) {unknown}; the methods are {sorted(known)}")
        plans = {key: [m for m in plan if m[0] in args.methods] for key, plan in plans.items()}
    total = sum(len(plans[st["name"]]) * args.seeds * st["tasks"] * st["steps"] for st in settings)
    with tqdm(total=total, unit="step", desc="continual", disable=args.no_progress,
              file=sys.stderr, mininterval=0.5) as progress:
        for st in settings:
            runs: dict[str, list] = {name: [] for name, _, _ in plans[st["name"]]}
            telemetry: dict[str, list] = {name: [] for name, _, _ in plans[st["name"]]}
            for seed in range(args.seeds):
                base = st["prepare"](seed)  # shared by every method of this seed
                for name, _, factory in plans[st["name"]]:
                    progress.set_postfix_str(f"{st['name']} seed {seed}: {name}")
                    if isinstance(factory, frontier.RecordedFactory):
                        factory.start_run()
                    runs[name].append(st["run"](name, factory, seed, base, progress))
                    if isinstance(factory, frontier.RecordedFactory):
                        telemetry[name].append(factory.last_run())
            out = root / st["name"] / ("frontier" if args.frontier else "")
            write(out, st, args, argv, plans[st["name"]], runs, telemetry)
            if args.frontier:
                frontier.report(out)
    return root


def write(out: Path, st: dict, args, argv, plan, runs, telemetry=None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["python -m benchmarks.continual", *(argv if argv is not None else sys.argv[1:])])
    environment = {"torch": torch.__version__, "python": platform.python_version(),
                   "threads": torch.get_num_threads(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    protocol = st["protocol"] + f", seeds 0..{args.seeds - 1}"
    summary = []
    for name, settings, _ in plan:
        row = {"method": name, "settings": settings, **metrics.summarize(runs[name])}
        row["accuracy_matrices"] = [r.accuracy for r in runs[name]]
        seen = [t for t in (telemetry or {}).get(name, []) if t["median_alpha"] is not None]
        if seen:  # the balance weight's behaviour, per seed and on average
            row["median_alpha"] = statistics.fmean(t["median_alpha"] for t in seen)
            row["fallback_fraction"] = statistics.fmean(t["fallback_fraction"] for t in seen)
            row["telemetry"] = seen
        summary.append(row)
    data = {"family": st["name"], "protocol": protocol, "command": command,
            "environment": environment, "results": summary}
    if args.merge and (out / "results.json").exists():
        data = merged(json.loads((out / "results.json").read_text()), data)
    summary = data["results"]
    (out / "results.json").write_text(json.dumps(data, indent=1))
    plot(summary, f"{st['name']}: {st['tasks']} tasks, {args.seeds} seeds",
         out / "forgetting_vs_new_acc.png")
    print(f"\n{st['name']}: {data['protocol']}")
    header = f"{'method':<38}{'Avg.ACC':>15}{'Forgetting':>15}{'New.ACC':>15}"
    print(header)
    print("-" * len(header))
    for row in summary:
        cells = "".join(f"{100 * row[m]:>8.1f} ±{100 * row[m + '_std']:4.1f}" for m in metrics.METRICS)
        print(f"{row['method']:<38}{cells}")
    print(f"wrote {out / 'results.json'} and {out / 'forgetting_vs_new_acc.png'}")


def merged(old: dict, new: dict) -> dict:
    """``old`` (a results.json of the same protocol) with the rows of ``new``'s methods replaced
    or added, and ``new``'s command and environment listed under ``"later_runs"``."""
    if old["protocol"] != new["protocol"]:
        raise SystemExit(f"--merge: the existing results are of another protocol\n  "
                         f"{old['protocol']}\n  this run: {new['protocol']}")
    rows = {row["method"]: row for row in old["results"]}
    for row in new["results"]:
        rows[row["method"]] = row | {"run": len(old.get("later_runs", [])) + 1}
    later = old.get("later_runs", []) + [{"command": new["command"], "environment": new["environment"],
                                          "methods": [row["method"] for row in new["results"]]}]
    return old | {"results": list(rows.values()), "later_runs": later}


def main(argv: list[str] | None = None) -> None:
    run(argv)
