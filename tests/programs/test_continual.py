"""The continual-learning suite (benchmarks/continual): its metrics follow their definitions, and
a CI-sized run writes well-formed results. What the suite measures is reported in
docs/continual.md, not asserted here."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llaca_optim.demo import Result

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.slow]

ROOT = str(Path(__file__).resolve().parents[2])  # the repository: benchmarks/ is run from there

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_metrics_follow_their_definitions():
    # R[i][j]: accuracy on task j after task i, worked out by hand from the definitions.
    r = Result("x", [[0.9], [0.5, 0.8], [0.2, 0.6, 0.7]], step_ms=0.0, backend="-")
    assert math.isclose(r.avg_acc, (0.2 + 0.6 + 0.7) / 3)
    assert math.isclose(r.forgetting, ((0.9 - 0.2) + (0.8 - 0.6)) / 2)  # best earlier minus final
    assert math.isclose(r.new_acc, (0.9 + 0.8 + 0.7) / 3)


def test_quick_run_writes_results(tmp_path, cpu_backend):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from benchmarks.continual import suite
    from benchmarks.continual.methods import methods

    # The sweep's rows are LLaCAAdamW with other scales: the presets' rows run the same code.
    root = suite.run(["--quick", "--no-sweep", "--out", str(tmp_path), "--no-progress"])
    for family, tasks, grid in (("digits", 3, None), ("lm-full", 4, suite.LM_GRID),
                                ("lm-lora", 4, suite.LM_GRID), ("digits-lora", 3, [])):
        data = json.loads((root / family / "results.json").read_text())
        names = [row["method"] for row in data["results"]]
        assert names == [name for name, _, _ in methods(1e-3, sweep=False, grid=grid)], family
        assert {"AdamW", "AdamW + EMA(0.99)", "LLaCAAdamW coin",
                "LLaCAAdamW continual-next"} <= set(names)
        for row in data["results"]:
            assert row["seeds"] == 2 and len(row["accuracy_matrices"]) == 2
            for matrix in row["accuracy_matrices"]:
                assert [len(r) for r in matrix] == list(range(1, tasks + 1))  # lower-triangular
                assert all(0.0 <= a <= 1.0 for r in matrix for a in r)
            for m in ("avg_acc", "forgetting", "new_acc"):
                assert -1.0 <= row[m] <= 1.0 and row[m + "_std"] >= 0.0
        png = root / family / "forgetting_vs_new_acc.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_lm_tasks_are_well_formed():
    """The generated instruction tasks: distinct formats, answers that follow from the prompt."""
    import random

    lm = pytest.importorskip("benchmarks.continual.lm")
    rng = random.Random(0)
    for _ in range(200):
        p, a = lm.make_example("add", rng)
        x, y = p.removeprefix("add ").removesuffix("=").split("+")
        assert a == str(int(x) + int(y))
        p, a = lm.make_example("rev", rng)
        assert a == p.removeprefix("rev ").removesuffix("=")[::-1]
        p, a = lm.make_example("key", rng)
        pairs, query = p.removeprefix("key ").removesuffix("=").split(" ?")
        assert dict((kv[0], kv[1]) for kv in pairs.split())[query] == a
        p, a = lm.make_example("cls", rng)
        assert a == ("hi" if p[4] > "m" else "lo")
    assert len({lm.make_example(t, rng)[0][:4] for t in lm.TASKS}) == len(lm.TASKS)


def test_each_family_runs_the_steps_it_reports():
    """Every setting's runner trains exactly tasks x steps steps, whatever other settings are
    built beside it (the runners are closures: a late-bound name once gave digits lm's count)."""
    pytest.importorskip("transformers")
    from benchmarks.continual import suite

    class Count:
        n = 0

        def update(self, k):
            self.n += k

        def set_postfix_str(self, _):
            pass

    args = suite.parse_args(["--quick", "--family", "all"])
    for st in suite.settings_of(args):
        counter = Count()
        base = st["prepare"](0)
        st["run"]("AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-3), 0, base, counter)
        assert counter.n == st["tasks"] * st["steps"], st["name"]
        assert f"x {st['steps']} steps" in st["protocol"], st["name"]


def test_alpha_against_tensor_size_runs_and_reports_every_tensor(tmp_path, cpu_backend):
    """benchmarks/continual/alpha_size.py at a tiny size: one row per trainable tensor, from the
    smallest to the largest, with the quantiles in order and a fitted slope (docs/coin-recipe.md
    reports the full-size run; no value is asserted here)."""
    from benchmarks.continual import alpha_size

    alpha_size.main(["--lora-widths", "64", "128", "--full-widths", "8", "--steps", "4",
                     "--out", str(tmp_path)])
    data = json.loads((tmp_path / "alpha_vs_size.json").read_text())
    sizes = [row["numel"] for row in data["summary"]]
    assert sizes == sorted(sizes) and len(sizes) == 6  # 2 x (A, B) + weight + bias
    assert all(r["R_p10"] <= r["R_median"] <= r["R_p90"] for r in data["summary"])
    assert math.isfinite(data["loglog_slope_R_vs_numel"])
    assert math.isfinite(data["loglog_slope_R_mean_vs_numel"])
    assert all(r["R_mean_p10"] <= r["R_mean_median"] <= r["R_mean_p90"] for r in data["summary"])
    assert (tmp_path / "alpha_vs_size.png").stat().st_size > 0


def test_methods_and_merge(tmp_path, cpu_backend):
    """--methods runs only the named methods; --merge puts their rows into results of the same
    protocol, keeping the others and listing the later run; another protocol is refused."""
    from benchmarks.continual import suite

    quick = ["--quick", "--family", "digits", "--out", str(tmp_path), "--no-progress"]
    suite.run([*quick, "--methods", "AdamW", "LLaCAAdamW coin"])
    first = json.loads((tmp_path / "digits" / "results.json").read_text())
    assert [row["method"] for row in first["results"]] == ["AdamW", "LLaCAAdamW coin"]
    suite.run([*quick, "--methods", "LLaCAAdamW coin-mean", "LLaCAAdamW coin", "--merge"])
    merged = json.loads((tmp_path / "digits" / "results.json").read_text())
    assert [row["method"] for row in merged["results"]] == [
        "AdamW", "LLaCAAdamW coin", "LLaCAAdamW coin-mean"]
    assert merged["results"][0] == first["results"][0]  # kept as it was
    assert merged["later_runs"][0]["methods"] == ["LLaCAAdamW coin", "LLaCAAdamW coin-mean"]
    with pytest.raises(SystemExit, match="another protocol"):
        suite.run([*quick, "--steps", "7", "--methods", "AdamW", "--merge"])
    with pytest.raises(SystemExit, match="unknown method"):
        suite.run([*quick, "--methods", "SGD"])


def test_published_code_path_probe(tmp_path):
    """benchmarks/continual/published_path.py (docs/coin-recipe.md): through the Hugging Face
    Trainer, right after optimizer.step() (where the published LLaCA code reads the gradients),
    every trainable tensor has its gradient without DeepSpeed and none has one under the
    published DeepSpeed configuration."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("deepspeed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port",
         str(port), "-m", "benchmarks.continual.published_path"],
        env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    lines = [json.loads(l[6:]) for l in run.stdout.splitlines() if l.startswith("PROBE ")]
    assert run.returncode == 0 and len(lines) == 2, run.stderr[-4000:]
    plain, published = lines
    assert plain["deepspeed"] is None and plain["tensor_steps_without_grad"] == 0
    assert published["tensor_steps"] > 0
    assert published["tensor_steps_without_grad"] == published["tensor_steps"]


def test_a_quick_frontier_writes_its_curves_and_verdict(tmp_path, cpu_backend):
    """``--frontier``: every method of the frontier (AdamW, the fixed EMA, LLaCA's scales for
    both norms, the horizon prototype) runs, and frontier.json holds the curves and the verdict."""
    import json

    from benchmarks.continual import frontier, suite

    suite.run(["--frontier", "--family", "digits", "--quick", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((tmp_path / "digits" / "frontier" / "frontier.json").read_text())
    ran = json.loads((tmp_path / "digits" / "frontier" / "results.json").read_text())
    assert {r["method"] for r in ran["results"]} == {
        name for name, _, _ in frontier.frontier_methods("digits", 1e-3, quick=True)}
    assert set(data["curves"]) == {"ema", "llaca-sum", "llaca-mean", "llaca-horizon"}
    assert set(data["verdict"]) == {"llaca-sum", "llaca-mean", "llaca-horizon"}
    for row in ran["results"]:
        if row["settings"]["kind"].startswith("llaca"):
            assert 0 <= row["fallback_fraction"] <= 1 and row["median_alpha"] > 0
    assert (tmp_path / "digits" / "frontier" / "frontier.png").is_file()
