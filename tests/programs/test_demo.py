"""The main job runs end to end and its metrics follow their definitions."""

from __future__ import annotations

import statistics

import pytest

pytest.importorskip("sklearn", reason="the demo's data ships with scikit-learn (test extra)")

from llaca_optim import demo  # noqa: E402

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.slow]


def test_demo_small_run(capsys):
    results = demo.run(["--tasks", "3", "--steps", "15", "--width", "32", "--seed", "3"])
    out = capsys.readouterr().out
    assert "Avg.ACC" in out and "Forgetting" in out and "New.ACC" in out
    assert [r.name for r in results][0] == "AdamW"
    for r in results:
        assert [len(row) for row in r.accuracy] == [1, 2, 3]
        assert all(0.0 <= a <= 1.0 for row in r.accuracy for a in row)
        assert r.avg_acc == pytest.approx(statistics.fmean(r.accuracy[-1]))
        assert r.new_acc == pytest.approx(statistics.fmean([r.accuracy[0][0], r.accuracy[1][1], r.accuracy[2][2]]))
        expected_forgetting = statistics.fmean(
            [max(r.accuracy[i][j] for i in range(j, 2)) - r.accuracy[2][j] for j in range(2)]
        )
        assert r.forgetting == pytest.approx(expected_forgetting)
        assert r.step_ms > 0


def test_demo_refuses_too_few_tasks():
    with pytest.raises(SystemExit):
        demo.main(["--tasks", "2"])
