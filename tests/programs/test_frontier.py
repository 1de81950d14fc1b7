"""The frontiers of benchmarks/continual: the comparison with the fixed EMA follows its
definition (linear reading of the EMA's curve, the spreads added in quadrature, the aim's
margins); the horizon prototype that the frontiers ran is what ``horizon=H`` computes, and its
alphas sit at 1/H whatever the tensor's size."""

from __future__ import annotations

import copy
import math
import random
import statistics

import pytest
import torch
from torch import nn

import llaca_optim
from benchmarks.continual import frontier
from benchmarks.continual.horizon import ALPHA_MAX, WINDOW, HorizonLLaCA


def _row(kind, method, forgetting, new_acc, f_std=0.01, n_std=0.01, **settings):
    return {"method": method, "settings": {"kind": kind, **settings}, "forgetting": forgetting,
            "forgetting_std": f_std, "new_acc": new_acc, "new_acc_std": n_std, "avg_acc": 0.5}


def test_the_analysis_reads_the_fixed_emas_curve_at_each_llaca_point():
    rng = random.Random()
    weights = [0.001, 0.01, 0.1]
    ema = [_row("ema", f"EMA w={w:g}", f, n, f_std=rng.uniform(0.005, 0.05), ema_weight=w)
           for w, f, n in zip(weights, sorted(rng.uniform(0.1, 0.7) for _ in weights),
                              sorted(rng.uniform(0.3, 0.95) for _ in weights))]
    lo, hi = ema[0], ema[1]
    t = rng.uniform(0.1, 0.9)
    new_acc = lo["new_acc"] + t * (hi["new_acc"] - lo["new_acc"])
    expected_ema = lo["forgetting"] + t * (hi["forgetting"] - lo["forgetting"])
    expected_std = lo["forgetting_std"] + t * (hi["forgetting_std"] - lo["forgetting_std"])
    ours = _row("llaca-sum", "LLaCA sum scale=1", expected_ema - 0.05, new_acc, f_std=0.02, scale=1.0)
    outside = _row("llaca-sum", "LLaCA sum scale=9", 0.0, 0.05, scale=9.0)  # below the curve's range
    horizon = _row("llaca-horizon", "LLaCA horizon=100", hi["forgetting"] - 0.025,
                   hi["new_acc"] - 0.02, horizon=100)
    horizon["median_alpha"] = 0.004
    result = frontier.analyse({"family": "f", "protocol": "p", "command": "c",
                               "results": ema + [ours, outside, horizon]})
    point = next(p for p in result["curves"]["llaca-sum"] if p["method"] == ours["method"])
    assert point["ema_forgetting_here"] == pytest.approx(expected_ema)
    assert point["gap"] == pytest.approx(0.05)
    assert point["spread"] == pytest.approx(math.hypot(expected_std, 0.02))
    assert point["below_ema"] == (0.05 > math.hypot(expected_std, 0.02))
    assert "gap" not in next(p for p in result["curves"]["llaca-sum"] if p["method"] == outside["method"])
    h = result["curves"]["llaca-horizon"][0]
    assert h["same_horizon_ema"] == "EMA w=0.01"
    assert h["forgetting_less_than_same_horizon"] == pytest.approx(0.025)
    assert h["aim_met_same_horizon"] and h["median_alpha_times_horizon"] == pytest.approx(0.4)


def _matrix(rng, tasks):
    """An accuracy matrix (row i: after task i) and its Avg.ACC, Forgetting and New.ACC, worked
    out here from the definitions (metrics.py's docstring)."""
    acc = [[rng.random() for _ in range(i + 1)] for i in range(tasks)]
    last = acc[-1]
    forgetting = statistics.fmean(max(acc[i][j] for i in range(j, tasks - 1)) - last[j]
                                  for j in range(tasks - 1))
    return acc, (statistics.fmean(last), forgetting, statistics.fmean(acc[i][i] for i in range(tasks)))


def test_the_paired_comparison_differences_each_seeds_runs():
    rng = random.Random()
    seeds, tasks = rng.randint(3, 7), rng.randint(2, 5)
    runs = {name: [_matrix(rng, tasks) for _ in range(seeds)] for name in ("A", "B", "C")}
    results = {"family": "f", "protocol": "p",
               "results": [{"method": name, "accuracy_matrices": [m for m, _ in made]}
                           for name, made in runs.items()]}
    out = frontier.paired(results, "A", "B")
    assert out["seeds"] == seeds
    for k, metric in enumerate(("avg_acc", "forgetting", "new_acc")):
        diffs = [a[k] - b[k] for (_, a), (_, b) in zip(runs["A"], runs["B"])]
        got = out["difference"][metric]
        assert math.isclose(got["mean"], statistics.fmean(diffs), abs_tol=1e-12), metric
        assert math.isclose(got["std"], statistics.stdev(diffs), abs_tol=1e-12), metric
        assert math.isclose(got["standard_error"], statistics.stdev(diffs) / math.sqrt(seeds),
                            abs_tol=1e-12), metric
        assert [row[f"{metric}_a"] for row in out["per_seed"]] == pytest.approx(
            [a[k] for _, a in runs["A"]])
    with pytest.raises(SystemExit, match="no method \\['D'\\]"):
        frontier.paired(results, "A", "D")


def test_the_fixed_ema_can_be_sampled_between_the_grids_weights():
    weights = (0.004, 0.0055)
    methods = frontier.frontier_methods("lm-lora", 1e-3, ema_weights=weights)
    emas = [(name, settings) for name, settings, _ in methods if settings["kind"] == "ema"]
    assert emas == [(f"EMA w={w:g}", {"kind": "ema", "ema_weight": w}) for w in weights]
    assert any(settings["kind"] == "llaca-mean" for _, settings, _ in methods)  # the rest as before


def _make(maker, params, horizon, backend="auto"):
    if maker == "prototype":
        return HorizonLLaCA(list(params), lr=1e-3, horizon=horizon)
    # The prototype's inner step: torch's AdamW with its default weight decay (0.01).
    return llaca_optim.LLaCAAdamW(params, lr=1e-3, weight_decay=0.01, horizon=horizon, backend=backend)


@pytest.mark.parametrize("maker", ["prototype", "library"])
@pytest.mark.parametrize("horizon", [10, 100, 1000])
def test_the_horizon_blends_about_one_over_h_at_every_size(maker, horizon):
    """Layers of very different sizes (12 to 60,000 elements): with a fixed scale their alphas
    differ by orders of magnitude; with a horizon, each tensor's median alpha over a task is
    within 3x of 1/H, and over the steps before the running mean starts forgetting (its first
    WINDOW) the alphas' geometric mean is 1/H exactly (the cap aside)."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 300), nn.Tanh(), nn.Linear(300, 200))
    optimizer = _make(maker, model.parameters(), horizon)
    seen = [[] for _ in model.parameters()]
    labels = torch.randint(0, 200, (400,))
    inputs = torch.randn(400, 4)
    for step in range(120):
        batch = torch.randint(0, 400, (32,))
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(inputs[batch]), labels[batch]).backward()
        optimizer.step()
        found = optimizer.alphas()
        for i, (alpha, fell_back) in enumerate(zip(found.alphas.tolist(), found.fell_back.tolist())):
            if not fell_back:
                seen[i].append(alpha)
    for alphas in seen:
        assert len(alphas) >= 100
        # The mean of log alpha over steps 2..t is log(1/H) + the mean of (log r_t - running
        # mean_t): exactly log(1/H) at the first adaptive step, and close over the first WINDOW.
        first = alphas[:WINDOW - 1]
        if max(first) < ALPHA_MAX:
            assert first[0] == pytest.approx(1 / horizon, rel=1e-6)
        assert 1 / 3 < statistics.median(alphas) * horizon < 3


def test_the_recipe_schedule_warms_up_then_decays_to_zero():
    """The published recipe's per-task schedule: linear warm-up over 3% of the steps, then a
    cosine to zero; restarted at every task by the runner."""
    from benchmarks.continual.digits_lora import lr_factor

    steps = random.randrange(200, 900)
    ramp = math.ceil(0.03 * steps)
    factors = [lr_factor(s, steps, "cosine", 0.03) for s in range(steps)]
    assert factors[:ramp] == pytest.approx([(s + 1) / ramp for s in range(ramp)])
    assert factors[ramp] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[ramp:], factors[ramp + 1:]))
    assert factors[-1] < 1e-4
    mid = ramp + (steps - ramp) // 2
    assert factors[mid] == pytest.approx(0.5 * (1 + math.cos(math.pi * (mid - ramp) / (steps - ramp))))
    assert {lr_factor(s, steps, "constant", 0.03) for s in range(steps)} == {1.0}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_the_library_horizon_is_the_prototype_the_frontiers_ran(backend):
    """``LLaCAAdamW(horizon=H)`` steps as benchmarks/continual/horizon.py does, step by step
    (weights, EMAs and alphas), so the frontiers' horizon points are the library's."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 40), nn.Tanh(), nn.Linear(40, 300), nn.Tanh(), nn.Linear(300, 5))
    models = [base, copy.deepcopy(base)]
    prototype = _make("prototype", models[0].parameters(), 30)
    library = _make("library", models[1].parameters(), 30, backend)
    for step in range(60):
        x, y = torch.randn(16, 8), torch.randint(0, 5, (16,))
        for model, optimizer in zip(models, (prototype, library)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        torch.testing.assert_close(library.alphas().alphas, prototype.alphas().alphas, rtol=1e-4, atol=0)
        assert torch.equal(library.alphas().fell_back, prototype.alphas().fell_back)
        for p, q in zip(models[1].parameters(), models[0].parameters()):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-5)
    for p, ema in zip(models[1].parameters(), prototype.ema):
        torch.testing.assert_close(library.ema(p), ema, rtol=0, atol=1e-5)
