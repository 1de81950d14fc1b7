"""The continual-learning suite (benchmarks/continual): its metrics follow their definitions, and
a CI-sized run writes well-formed results. What the suite measures is reported in the README, not
asserted here."""

from __future__ import annotations

import json
import math

import pytest

from llaca_optim.demo import Result

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")


def test_metrics_follow_their_definitions():
    # R[i][j]: accuracy on task j after task i, worked out by hand from the definitions.
    r = Result("x", [[0.9], [0.5, 0.8], [0.2, 0.6, 0.7]], step_ms=0.0, backend="-")
    assert math.isclose(r.avg_acc, (0.2 + 0.6 + 0.7) / 3)
    assert math.isclose(r.forgetting, ((0.9 - 0.2) + (0.8 - 0.6)) / 2)  # best earlier minus final
    assert math.isclose(r.new_acc, (0.9 + 0.8 + 0.7) / 3)


def test_quick_run_writes_results(tmp_path, cpu_backend):
    from benchmarks.continual import suite
    from benchmarks.continual.methods import methods

    out = suite.run(["--quick", "--out", str(tmp_path), "--no-progress"])
    data = json.loads((out / "results.json").read_text())
    names = [row["method"] for row in data["results"]]
    assert names == [name for name, _, _ in methods(1e-3)]
    assert {"AdamW", "AdamW + EMA(0.99)", "LLaCAAdamW coin", "LLaCAAdamW continual-next"} <= set(names)
    for row in data["results"]:
        assert row["seeds"] == 2 and len(row["accuracy_matrices"]) == 2
        for matrix in row["accuracy_matrices"]:
            assert [len(r) for r in matrix] == [1, 2, 3]  # lower-triangular, 3 tasks
            assert all(0.0 <= a <= 1.0 for r in matrix for a in r)
        for m in ("avg_acc", "forgetting", "new_acc"):
            assert -1.0 <= row[m] <= 1.0 and row[m + "_std"] >= 0.0
    assert (out / "forgetting_vs_new_acc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
