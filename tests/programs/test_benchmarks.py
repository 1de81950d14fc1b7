"""The benchmark suite at CI size: it runs, and what it writes is well formed. No timing is
asserted (docs/spec.md section 5's ratios are measured by ``python -m benchmarks``, never in tests)."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest

from llaca_optim import _build

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.slow]

ROOT = _build.PACKAGE_DIR.parent
pytest.importorskip("matplotlib")


def test_quick_run_writes_well_formed_results(tmp_path, cpu_backend):
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import cli, contenders
    finally:
        sys.path.remove(str(ROOT))
    out = cli.run(["--quick", "--device", "cpu", "--out", str(tmp_path), "--no-progress"])
    assert out == tmp_path
    names = {p.name for p in tmp_path.iterdir()}
    assert {"results.json", "results.csv", "results.md", "time_vs_tensors.png",
            "time_vs_size.png"} <= names

    data = json.loads((tmp_path / "results.json").read_text())
    env, rows = data["environment"], data["rows"]
    assert "docs/spec.md section 5 targets" in (tmp_path / "results.md").read_text()
    assert env["device"] and env["versions"]["torch"] and env["versions"]["llaca_optim"]
    assert rows and all(set(r) == set(data["columns"]) for r in rows)

    # Every measurement has every baseline and both of our entry points on the cpu backend.
    measurements = {(r["workload"], r["dtype"]) for r in rows}
    assert {r["family"] for r in rows} == {"lora_llama", "full", "many_tiny", "tensors_sweep",
                                           "size_sweep"}
    assert {d for _, d in measurements} == {"float32", "bfloat16"}
    expected = {contenders.ADAMW_FUSED, contenders.PUBLISHED, contenders.FOREACH, contenders.COPY,
                "LLaCAAdamW[cpu]", "LLaCA(AdamW(fused))[cpu]", "LLaCAAdamW[reference]"}
    for m in measurements:
        impls = {r["implementation"] for r in rows if (r["workload"], r["dtype"]) == m}
        assert expected <= impls, f"{m}: missing {expected - impls}"

    for r in rows:
        what = f"{r['workload']} {r['dtype']} {r['implementation']}"
        assert r["steps_timed"] >= 3, what
        assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"], what
        assert math.isclose(r["bandwidth_GBps"], r["model_bytes"] / (r["median_ms"] * 1e6),
                            rel_tol=1e-9), what
        assert r["x_adamw_fused"] > 0 and r["speedup_vs_foreach"] > 0, what
        assert r["state_bytes"] > 0 or r["implementation"] == contenders.COPY, what
        if r["family"] in ("lora_llama", "full", "many_tiny") and r["backend"] == "cpu":
            # docs/spec.md section 5: no per-step allocation proportional to the model. The fused
            # optimizer allocates nothing; the wrapper's inner torch step a few bytes; the
            # sharded path its per-tensor alpha arithmetic (a few scalars per tensor, no data),
            # and the horizon's finish more of those (its signal statistic's arithmetic).
            if "sharded" in r["implementation"]:
                limit = 128 * r["n_tensors"]
            elif "horizon" in r["implementation"]:
                limit = 512 * r["n_tensors"]
            else:
                limit = 0 if r["implementation"].startswith("LLaCAAdamW") else 4096
            assert r["step_alloc_bytes"] <= limit, what
        if r["implementation"] == contenders.ADAMW_FUSED:
            assert r["x_adamw_fused"] == 1.0, what
        if r["implementation"] == contenders.COPY:
            assert r["fraction_of_copy"] == pytest.approx(1.0), what
    # The bytes model: 11 accesses of 4 bytes for fp32; 9 of 2 bytes plus an fp32 EMA for bf16.
    for r in rows:
        if r["bytes_model"] == "llaca":
            per_element = 44 if r["dtype"] == "float32" else 26
            assert r["model_bytes"] == per_element * r["n_elements"]

    with (tmp_path / "results.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows) and list(table[0]) == data["columns"]
    md = (tmp_path / "results.md").read_text()
    assert md.count("\n| ") >= len([r for r in rows if r["family"] in ("lora_llama", "full",
                                                                        "many_tiny")])
    for png in ("time_vs_tensors.png", "time_vs_size.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_microbenchmarks_run(cpu_backend):
    """pytest benchmarks/ with timing disabled: each microbenchmark runs once."""
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(ROOT / "benchmarks")],
        capture_output=True, text=True, cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


def test_triton_tune_quick_run_times_every_candidate(tmp_path, triton_backend):
    """benchmarks/triton_tune.py at CI size (Triton's interpreter): each candidate is timed
    beside the copy and the fastest is named; no timing is asserted."""
    out = tmp_path / "tune.json"
    subprocess.run([sys.executable, "-m", "benchmarks.triton_tune", "--quick", "--out", str(out)],
                   cwd=ROOT, check=True, capture_output=True, text=True)
    data = json.loads(out.read_text())
    block = data["environment"]["defaults"]["block"]
    names = {f"LLaCAAdamW[triton] block={block} warps=4",
             f"LLaCAAdamW[triton] block={2 * block} warps=8"}
    assert len(data["fastest"]) == 2  # fp32 and bf16
    for measurement, fastest in data["fastest"].items():
        timed = {r["implementation"] for r in data["rows"]
                 if f"{r['workload']} {r['dtype']}" == measurement}
        assert names | {"copy"} == timed and fastest in names
    assert all(r["median_ms"] > 0 and r["steps_timed"] >= 3 for r in data["rows"])


def test_spec_targets_are_read_from_the_rows():
    """The docs/spec.md section 5 verdicts come from the measured columns and their bounds alone; a
    target whose row is missing is 'not measured', never met. (Synthetic rows: no timing.)"""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import report
    finally:
        sys.path.remove(str(ROOT))

    def row(family, impl, dtype, **values):
        base = {"family": family, "workload": f"{family}[x]", "dtype": dtype,
                "implementation": impl, "fraction_of_copy": None, "x_adamw_fused": None,
                "speedup_vs_published": None, "speedup_vs_foreach": None}
        return {**base, **values}

    rows = [row("full", "LLaCAAdamW[cuda]", "float32", fraction_of_copy=0.86, x_adamw_fused=1.8,
                speedup_vs_published=2.5, speedup_vs_foreach=1.5),
            row("lora_llama", "LLaCAAdamW[cuda] graph", "bfloat16", fraction_of_copy=0.64)]
    found = {(t["workload"], t["dtype"], t["implementation"], t["column"]): t["met"]
             for t in report.targets({"device_type": "cuda"}, rows)}
    assert found[("full[x]", "float32", "LLaCAAdamW[cuda]", "fraction_of_copy")] is True
    assert found[("full[x]", "float32", "LLaCAAdamW[cuda]", "x_adamw_fused")] is False
    assert found[("full[x]", "float32", "LLaCAAdamW[cuda]", "speedup_vs_published")] is True
    assert found[("full[x]", "float32", "LLaCAAdamW[cuda]", "speedup_vs_foreach")] is False
    assert found[("lora_llama[x]", "bfloat16", "LLaCAAdamW[cuda] graph", "fraction_of_copy")] is False
    assert found[("full", "float32", "LLaCAAdamW[triton]", "fraction_of_copy")] is None
    assert found[("full", "bfloat16", "LLaCAAdamW[cuda]", "fraction_of_copy")] is None
    assert not report.targets({"device_type": "cpu"}, rows) == []  # the CPU targets, unmeasured
    assert all(t["met"] is None for t in report.targets({"device_type": "cpu"}, rows))


def test_a_failing_contender_costs_its_row_only(cpu_backend):
    """On a first run on a new GPU any of our contenders may fail (a capture, a launch): the run
    goes on, the other rows are measured, and the failure is said instead of a row."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks import contenders as C, harness, report, workloads
    finally:
        sys.path.remove(str(ROOT))
    import torch

    class FailsOnSecondStep(C.Stepper):
        calls = 0

        def step(self):
            FailsOnSecondStep.calls += 1
            if FailsOnSecondStep.calls == 2:
                raise RuntimeError("stepped wrong")

    def cannot_build(params):
        raise ValueError("cannot build")

    workload = workloads.full(2, 64)
    params = workload.make_params(torch.float32, "cpu")
    cs = [C.Contender(C.COPY, "baseline", "torch", "copy",
                      lambda ps: C.DeviceCopy(C.model_bytes("llaca", params), torch.device("cpu"))),
          C.Contender("bad build", "ours", "cpu", "llaca", cannot_build),
          C.Contender("bad step", "ours", "cpu", "llaca", lambda ps: FailsOnSecondStep())]
    results = harness.measure(cs, params, warmup=1, steps=4, budget_s=1.0, memory=False)
    rows = report.rows_for(workload, torch.float32, params, cs, results)
    assert [r["implementation"] for r in rows] == [C.COPY]
    failed = report.failures(workload, torch.float32, results)
    assert failed == {f"{workload.name} float32 bad build": "ValueError: cannot build",
                      f"{workload.name} float32 bad step": "RuntimeError: stepped wrong"}
