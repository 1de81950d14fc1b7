"""``python -m benchmarks.triton_tune``: time the Triton kernels' block size and warps per program.

The Triton configuration is chosen by measurement on a GPU. The element-wise passes run one
program per ``block`` elements with ``num_warps`` warps; this times
``LLaCAAdamW(backend=triton_backend(..., block, num_warps))`` for each candidate on the ``full``
and ``lora_llama`` workloads of docs/spec.md section 5 (fp32 and bf16) beside a device copy of the same bytes,
through the benchmark harness (CUDA events, medians), and names the fastest per measurement.
What it finds is then set as ``BLOCK`` / ``NUM_WARPS`` in llaca_optim/ops/triton/launcher.py by hand, with the figures
committed, never chosen at run time (a step must not depend on a timing).

    python -m benchmarks.triton_tune --out results.json        # on a GPU (gpu_run.sh runs it)
    python -m benchmarks.triton_tune --quick --out /tmp/t.json # CPU, Triton's interpreter: runs

The block size also fixes the order of the per-tensor sums, so each candidate is deterministic
but candidates differ in the last bits; tests/backends/test_parity.py holds a non-default one to the
parity rule.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported: the interpreter runs on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from llaca_optim import LLaCAAdamW  # noqa: E402
from llaca_optim.ops import triton as _triton  # noqa: E402
from llaca_optim.ops.registry import triton_backend  # noqa: E402

from . import contenders as C  # noqa: E402
from . import harness, report, workloads  # noqa: E402

# (block, num_warps): 1024 elements at 4 warps is 8 per thread (two 16-byte fp32 vectors);
# larger blocks put more loads in flight per program and launch fewer programs.
CANDIDATES = [(1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]
QUICK_CANDIDATES = [(_triton.BLOCK, 4), (2 * _triton.BLOCK, 8)]


def candidate_contenders(candidates, device: torch.device, nbytes: int) -> list[C.Contender]:
    out = [C.Contender(C.COPY, "baseline", "torch", "copy",
                       lambda ps: C.DeviceCopy(nbytes, device))]
    for block, warps in candidates:
        out.append(C.Contender(
            f"LLaCAAdamW[triton] block={block} warps={warps}", "ours", "triton", "llaca",
            lambda ps, b=block, w=warps: C.OptimizerStepper(LLaCAAdamW(
                ps, backend=triton_backend(device.type, block=b, num_warps=w)))))
    return out


def run(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that it runs")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="start no new measurement after this many seconds")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        plan, candidates, steps, warmup = [workloads.full(2, 128)], QUICK_CANDIDATES, 3, 1
    else:
        if device.type != "cuda":
            raise SystemExit("triton_tune times a GPU; on a CPU only --quick runs "
                             "(through Triton's interpreter)")
        plan, candidates, steps, warmup = ([workloads.full(16, 4096), workloads.lora_llama(32)],
                                           CANDIDATES, 20, 3)
    env = report.environment(device)
    env["defaults"] = {"block": _triton.BLOCK, "num_warps": _triton.NUM_WARPS}
    rows, best, started = [], {}, time.monotonic()
    for workload in plan:
        for dtype in (torch.float32, torch.bfloat16):
            if args.time_limit is not None and time.monotonic() - started > args.time_limit:
                env.setdefault("not_measured", []).append(report.label(workload, dtype))
                continue
            params = workload.make_params(dtype, device)
            cs = candidate_contenders(candidates, device, C.model_bytes("llaca", params))
            results = harness.measure(cs, params, warmup=warmup, steps=steps, budget_s=5.0,
                                      memory=False)
            measured = report.rows_for(workload, dtype, params, cs, results)
            rows += measured
            report.note_failures(env, workload, dtype, results)
            ours = [r for r in measured if r["kind"] == "ours"]
            if not ours:
                continue
            fastest = min(ours, key=lambda r: r["median_ms"])
            what = report.label(workload, dtype)
            best[what] = fastest["implementation"]
            # fraction_of_copy is None when the copy itself failed: report._fmt prints "–".
            print(f"{what}: " + ", ".join(
                f"{r['implementation'].split('] ')[1]} {r['median_ms']:.3f} ms "
                f"({report._fmt(r['fraction_of_copy'])} of copy)" for r in ours) + "; fastest: "
                f"{fastest['implementation'].split('] ')[1]}", flush=True)
            del params, results
    data = {"environment": env, "rows": rows, "fastest": best}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(data, indent=1))
    return data


def main(argv: list[str] | None = None) -> None:
    run(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
