"""The balance weights speak: a task in which LLaCA was a fixed EMA (nearly every alpha fell back
to base_weight), or one whose EMA was too slow to follow the weights, ends with one warning that
names the knob to turn; once per optimizer, never during a step."""

from __future__ import annotations

import warnings

import pytest
import torch
from llaca_optim import LLaCAAdamW
from llaca_optim.optim import telemetry
from support.state import make_model, make_optimizer, train


def make(kind, model, **knobs):
    # The wrapper around AdamW, as the Trainer builds it.
    return make_optimizer(kind, model.parameters(), inner=lambda ps: torch.optim.AdamW(ps, lr=1e-2),
                          **knobs)


def messages(record):
    return [str(w.message) for w in record if "llaca_optim:" in str(w.message)]


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_a_task_run_as_a_fixed_ema_says_so_once(kind):
    model = make_model()
    optimizer = make(kind, model, scale=1e9)  # every alpha far above 1: all fall back
    train(model, optimizer, telemetry.MIN_STEPS + 5)
    assert bool(optimizer.alphas().fell_back.all())
    with pytest.warns(UserWarning, match=r"100% of the tensors' alphas fell out.*fixed EMA.*Lower `scale`"):
        optimizer.end_task()
    train(model, optimizer, telemetry.MIN_STEPS + 5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer.end_task()
    assert messages(record) == []  # said once


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_an_ema_too_slow_for_its_task_says_so(kind):
    model = make_model()
    optimizer = make(kind, model, scale=1e-12, norms="mean")
    steps = telemetry.MIN_STEPS + 10
    train(model, optimizer, steps)
    found = optimizer.alphas()
    median = float(found.alphas.double().median())
    assert telemetry.kept_share(median, steps) < telemetry.MIN_KEPT
    with pytest.warns(UserWarning, match=rf"median alpha was .* in a task of {steps} steps.*Raise `scale`"):
        optimizer.end_task()


def test_short_tasks_and_adaptive_alphas_say_nothing():
    model = make_model()
    optimizer = LLaCAAdamW(model.parameters(), lr=1e-2, scale=1e9)
    train(model, optimizer, telemetry.MIN_STEPS - 1)  # too short to judge
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        optimizer.end_task()
    assert messages(record) == []


@pytest.mark.parametrize("median, fallback, steps, codes", [
    (0.01, 0.96, 100, [telemetry.FIXED_EMA]),
    (0.01, 0.50, 100, []),                    # 1 - 0.99^100 = 63% kept
    (0.001, 0.50, 100, [telemetry.TOO_SLOW]),  # 10% kept
    (0.001, 0.50, 1000, []),
    (1e-9, 0.99, 100, [telemetry.FIXED_EMA]),  # the fallback is what the task ran on
    (0.01, 1.0, telemetry.MIN_STEPS - 1, []),
])
def test_the_rules(median, fallback, steps, codes):
    assert [code for code, _ in telemetry.diagnose(median, fallback, steps)] == codes


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_a_horizon_longer_than_its_task_names_the_horizon(kind):
    """With horizon=H the level is 1/H: a horizon far beyond the task's length discards the
    task, and the warning names the knob that set it."""
    model = make_model()
    optimizer = make(kind, model, horizon=10_000)
    steps = telemetry.MIN_STEPS + 10
    train(model, optimizer, steps)
    with pytest.warns(UserWarning, match=rf"in a task of {steps} steps.*Lower `horizon`"):
        optimizer.end_task()
