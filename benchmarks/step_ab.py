"""An interleaved A/B of the optimizer step between two checkouts, on one machine.

    python -m benchmarks.step_ab --other /path/to/other/checkout [--rounds 4]

For each workload (lora_llama, full, many_tiny, CPU sizes) and dtype, each round runs one
process per checkout, alternating which goes first; each process times ``LLaCAAdamW`` (backend
``cpu``, with ``--knobs``) against ``torch.optim.AdamW(fused=True)`` over the same parameters, interleaved step by
step, and reports the median of each and their ratio. The ratio to fused AdamW in the same
process is what compares across processes: it cancels the machine's load at that moment. Prints
a table of the ratios (min-max over rounds) of both checkouts and the median difference.

The other checkout needs the compiled extension: copy this checkout's ``llaca_optim/_C*.so``
into it when the C++ sources are the same.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
CASES = [("lora_llama", "float32"), ("lora_llama", "bfloat16"), ("full", "float32"),
         ("full", "bfloat16"), ("many_tiny", "float32"), ("many_tiny", "bfloat16")]

CHILD = r"""
import json, statistics, sys, time
import torch
from benchmarks import workloads
import llaca_optim
family, dtype, steps = sys.argv[1], getattr(torch, sys.argv[2]), int(sys.argv[3])
knobs = json.loads(sys.argv[4])
work = next(w for w in workloads.main_workloads("cpu", False) if w.family == family)
ours_p = work.make_params(dtype, "cpu")
theirs_p = work.make_params(dtype, "cpu")
ours = llaca_optim.LLaCAAdamW(ours_p, lr=1e-4, backend="cpu", **knobs)
theirs = torch.optim.AdamW(theirs_p, lr=1e-4, fused=True)
times = {"ours": [], "adamw": []}
for i in range(steps + 5):
    for name, opt in (("ours", ours), ("adamw", theirs)) if i % 2 else (("adamw", theirs), ("ours", ours)):
        start = time.perf_counter()
        opt.step()
        if i >= 5:
            times[name].append(time.perf_counter() - start)
o, a = statistics.median(times["ours"]), statistics.median(times["adamw"])
print(json.dumps({"ours_ms": 1e3 * o, "adamw_ms": 1e3 * a, "ratio": o / a}))
"""


def run_one(checkout: Path, family: str, dtype: str, steps: int, knobs: str = "{}") -> dict:
    env = {**os.environ, "PYTHONPATH": f"{checkout}{os.pathsep}{HERE}"}
    out = subprocess.run([sys.executable, "-c", CHILD, family, dtype, str(steps), knobs], env=env,
                         capture_output=True, text=True, check=True, cwd=checkout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--other", type=Path, required=True, help="the other checkout (A)")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--knobs", default="{}", metavar="JSON",
                   help='LLaCAAdamW keyword arguments for both checkouts, e.g. \'{"horizon": 100}\'')
    args = p.parse_args(argv)
    try:
        knobs = json.loads(args.knobs)
    except json.JSONDecodeError as err:
        p.error(f"--knobs must be a JSON object of LLaCAAdamW keyword arguments: {err}")
    if not isinstance(knobs, dict):
        p.error(f"--knobs must be a JSON object of LLaCAAdamW keyword arguments, got {args.knobs}")
    rows = []
    for family, dtype in CASES:
        ratios = {"A": [], "B": []}
        for r in range(args.rounds):
            order = (("A", args.other), ("B", HERE)) if r % 2 == 0 else (("B", HERE), ("A", args.other))
            for name, checkout in order:
                ratios[name].append(run_one(checkout, family, dtype, args.steps, args.knobs)["ratio"])
        a, b = statistics.median(ratios["A"]), statistics.median(ratios["B"])
        rows.append((family, dtype, ratios, a, b))
        print(f"{family:<11}{dtype:<10} A {min(ratios['A']):.3f}-{max(ratios['A']):.3f}   "
              f"B {min(ratios['B']):.3f}-{max(ratios['B']):.3f}   median B/A {b / a:.3f}", flush=True)


if __name__ == "__main__":
    main()
