"""``python -m benchmarks``: time LLaCAAdamW against every baseline and write the results.

Examples::

    python -m benchmarks                         # this machine's device, all workloads and sweeps
    python -m benchmarks --quick --out /tmp/b    # a CI-sized run: checks that it all works
    python -m benchmarks --workloads lora_llama --dtypes float32 --no-sweeps

Writes results.json, results.csv, results.md, time_vs_tensors.png and time_vs_size.png into
``--out`` (default: bench-results/<device>/ in the current folder). The committed results in
benchmarks/results/ are written only when ``--out`` names their folder.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from . import contenders as C
from . import harness, report, workloads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RESULTS_ROOT = Path(__file__).resolve().parent / "results"  # committed; written only by name
DEFAULT_ROOT = Path("bench-results")


def parse_args(argv: list[str] | None, prog: str = "python -m benchmarks") -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda if present, else cpu), cpu or cuda")
    p.add_argument("--workloads", nargs="+", default=list(report.MAIN_FAMILIES),
                   choices=list(report.MAIN_FAMILIES))
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    p.add_argument("--no-sweeps", action="store_true", help="skip the series behind the plots")
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes and few steps: checks that everything runs (used by the tests)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per contender (default 30)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed steps per contender before it stops early (default 6)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new measurement after this many seconds; results.json lists "
                        "the ones left out (for a fixed time slot on a GPU machine)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for CPU runs")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: bench-results/<device>/ in the current folder; "
                        "name benchmarks/results/<device> to update the committed results)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--replot", type=Path, default=None, metavar="DIR",
                   help="only rewrite the table, CSV and plots of DIR/results.json (no timing)")
    p.add_argument("--brief", type=Path, default=None, metavar="DIR",
                   help="only print a few lines per measurement of DIR/results.json")
    return p.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu")
    return device


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def run(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> Path:
    args = parse_args(argv, prog)
    if args.brief:
        data = json.loads((args.brief / "results.json").read_text())
        print(report.brief(data["environment"], data["rows"], report.MAIN_FAMILIES), end="")
        return args.brief
    if args.replot:
        data = json.loads((args.replot / "results.json").read_text())
        for path in report.write_all(args.replot, data["environment"], data["rows"], json_too=False):
            print(f"wrote {path}")
        return args.replot
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    steps = args.steps or (4 if args.quick else 30)
    budget = args.budget or (1.0 if args.quick else 6.0)
    warmup = 1 if args.quick else args.warmup
    env = report.environment(device)
    # Never the committed results unless --out names them: a quick run, or one on another
    # machine of the same CPU name, would overwrite the figures the docs link to.
    out_dir = args.out or DEFAULT_ROOT / slug(env["device"].split(" (")[0] + "-" + device.type)

    plan: list[workloads.Workload] = [w for w in workloads.main_workloads(device.type, args.quick)
                                      if w.family in args.workloads]
    if not args.no_sweeps:
        for series in workloads.sweeps(device.type, args.quick).values():
            plan += series
    jobs = [(w, DTYPES[d]) for w in plan for d in args.dtypes]

    rows = []
    started = time.monotonic()
    bar = tqdm(jobs, desc="benchmarks", unit="measurement", disable=args.no_progress,
               file=sys.stderr)
    for i, (workload, dtype) in enumerate(bar):
        if args.time_limit is not None and time.monotonic() - started > args.time_limit:
            # The main workloads come first in the plan, so what a limit cuts is the sweeps.
            env["not_measured"] = [report.label(w, d) for w, d in jobs[i:]]
            print(f"--time-limit {args.time_limit:g} s reached: {len(jobs) - i} measurements "
                  "left out (listed in results.json)", file=sys.stderr)
            break
        bar.set_postfix_str(f"{workload.name} {dtype}".replace("torch.", ""))
        params = workload.make_params(dtype, device)
        nbytes = C.model_bytes("llaca", params)
        # The published loop costs a host round trip per tensor: on the largest tensor sweeps it
        # would take minutes for nothing new, so it stops at 3,000 tensors.
        cs = C.contenders(device, nbytes, include_published=workload.n_tensors <= 3000)
        main_workload = workload.family in report.MAIN_FAMILIES
        results = harness.measure(cs, params, warmup=warmup, steps=steps, budget_s=budget,
                                  memory=main_workload)
        rows += report.rows_for(workload, dtype, params, cs, results)
        report.note_failures(env, workload, dtype, results)
        report.write_json(out_dir, env, rows)
        del params, results
    written = report.write_all(out_dir, env, rows)
    print(report.markdown(env, rows, report.MAIN_FAMILIES))
    for path in written:
        print(f"wrote {path}")
    return out_dir


def main(argv: list[str] | None = None, prog: str = "python -m benchmarks") -> None:
    run(argv, prog)
