"""Continual-learning metrics from an accuracy matrix R (R[i][j]: accuracy on task j after
training task i), as the LLaCA paper and Continual-NExT report them:

    Avg.ACC    = mean of the last row             (the final model on every task)
    Forgetting = mean over j < T-1 of max_{i<T-1} R[i][j] - R[T-1][j]
    New.ACC    = mean of the diagonal             (how well each task was learned when it came)

The per-run numbers come from llaca_optim.demo.Result (the main job uses the same definitions);
this module aggregates them over seeds.
"""

from __future__ import annotations

import statistics
from typing import Any

from llaca_optim.demo import Result

METRICS = ("avg_acc", "forgetting", "new_acc")


def summarize(runs: list[Result]) -> dict[str, Any]:
    """Mean and (sample) standard deviation of each metric over the runs of one method."""
    out: dict[str, Any] = {"seeds": len(runs)}
    for m in METRICS:
        values = [getattr(r, m) for r in runs]
        out[m] = statistics.fmean(values)
        out[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["step_ms"] = statistics.fmean(r.step_ms for r in runs)
    return out
