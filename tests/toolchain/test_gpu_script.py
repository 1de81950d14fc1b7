"""benchmarks/gpu_run.sh is run once on a GPU machine, inside a time slot of a few minutes
(NOTE [fitting the lease] in the script). Its mistakes would cost that slot, so its contract is
checked here, on a CPU, with a tiny budget: it ends inside its budget whatever its stages do,
records every stage in summary.txt, and leaves no more than 8 files (flat, plain names)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

from llaca_optim import _build

import pytest

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.build, pytest.mark.slow, pytest.mark.extended]

ROOT = _build.PACKAGE_DIR.parent
SCRIPT = ROOT / "benchmarks" / "gpu_run.sh"
STAGES = ["tests_gpu", "bench", "triton_tune", "memcheck", "tests_rest"]


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def test_script_keeps_to_its_budget_and_the_device_tools_file_limits(tmp_path):
    budget = 12
    out = tmp_path / "out"
    # The stages it cuts short may be killed inside torch's extension build (the CUDA emulation
    # the tests load), which leaves that build's lock file behind: in a folder of its own, not in
    # the cache the rest of the suite waits on.
    env = dict(os.environ, LLACA_GPU_BUDGET_S=str(budget), LLACA_GPU_SKIP_BUILD="1",
               TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"))
    start = time.monotonic()
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=env, capture_output=True,
                          text=True, timeout=budget + 60)
    wall = time.monotonic() - start
    assert done.returncode == 0, done.stderr[-2000:]
    # timeout's --kill-after grace and the summary's tails are all that may exceed the budget.
    assert wall < budget + 15, f"took {wall:.0f} s on a budget of {budget} s"

    files = sorted(p for p in out.rglob("*"))
    assert all(p.is_file() and p.parent == out for p in files), files
    assert len(files) <= 8, [p.name for p in files]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", p.name) for p in files)

    summary = (out / "summary.txt").read_text()
    for name in STAGES:  # each stage ran (perhaps cut short) or says it did not fit
        assert re.search(rf"^stage {name}: (rc=\d+ in \d+ s|not run, )", summary,
                         re.M), f"stage {name} missing from summary.txt:\n{summary}"
    assert "cpu True" in summary  # the backend status, read from the installed package
    assert done.stdout.rstrip().endswith(summary.rstrip().splitlines()[-1])


def test_benchmark_time_limit_lists_what_it_left_out(tmp_path, cpu_backend):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import cli
    finally:
        sys.path.remove(str(ROOT))
    cli.run(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress",
             "--dtypes", "float32", "--time-limit", "0"])
    data = json.loads((tmp_path / "results.json").read_text())
    # A limit of 0 s still measures nothing past the first check: every job is listed, in plan
    # order, the main workloads first.
    left_out = data["environment"]["not_measured"]
    assert data["rows"] == [] and left_out[0].startswith("lora_llama") and len(left_out) == 7
    # What the script prints for the reply names them too.
    brief = subprocess.run([sys.executable, "-m", "benchmarks", "--brief", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "not measured (time limit): lora_llama" in brief
