"""What the balance weights say about the settings, said once: when LLaCA is in fact a fixed EMA
(nearly every tensor's alpha fell out of (0, 1) and took ``base_weight``), and when the alphas are
so small that the EMA cannot follow the weights within a task (``end_task`` then puts back weights
close to where the task started). Read at ``end_task`` (a host read there costs nothing that
matters) and by the Trainer callback at its logging steps; never during a step."""

from __future__ import annotations

from typing import Any

# Thresholds: a share of fallbacks that leaves nothing adaptive; a task long enough to judge; the
# part of a task's movement the EMA must keep (1 - (1 - alpha)^steps) not to discard the task.
FALLBACK_SHARE = 0.95
MIN_STEPS = 20
MIN_KEPT = 0.5

FIXED_EMA = "fixed-ema"
TOO_SLOW = "too-slow"


def summarize(alphas: Any, fell_back: Any) -> tuple[float, float] | None:
    """The median alpha and the share that fell back, over the tensors that have had a LLaCA step
    (a negative alpha marks one that has not), from ``optimizer.alphas()``'s tensors; None before
    the first. Reading them is a host read."""
    stepped = alphas >= 0
    if alphas.numel() == 0 or not bool(stepped.any()):
        return None
    return (float(alphas[stepped].double().median()),
            float(fell_back[stepped].double().mean()))


def kept_share(alpha: float, steps: int) -> float:
    """How much of what a task moved the weights an EMA of constant weight ``alpha`` keeps at
    the task's end, after ``steps`` steps."""
    return 1.0 - (1.0 - min(max(alpha, 0.0), 1.0)) ** steps


def uses_horizon(optimizer: Any) -> bool:
    """Whether a group of ``optimizer`` sets its level with ``horizon`` (the knob to name)."""
    return any(group.get("horizon") is not None for group in optimizer.param_groups)


def diagnose(median_alpha: float, fallback_fraction: float, steps: int,
             horizon: bool = False) -> list[tuple[str, str]]:
    """``(code, message)`` for each thing the task's balance weights say about the settings:
    ``median_alpha`` and ``fallback_fraction`` over the tensors, ``steps`` the task's steps;
    ``horizon``: the level was set with ``horizon`` (the knob the messages name)."""
    found = []
    if steps < MIN_STEPS:
        return found
    if fallback_fraction >= FALLBACK_SHARE and horizon:
        found.append((FIXED_EMA, (
            f"llaca_optim: {fallback_fraction:.0%} of the tensors' signals were not finite "
            "(no drift from the EMA, or no change of the gradient: |p - ema| * |g - g_prev| = 0), "
            "so their alphas took 1/horizon: LLaCA ran as a fixed EMA. Check that the gradients "
            "change between steps; docs/continual.md, 'Choosing settings'")))
    elif fallback_fraction >= FALLBACK_SHARE:
        found.append((FIXED_EMA, (
            f"llaca_optim: {fallback_fraction:.0%} of the tensors' alphas fell out of (0, 1) and "
            "took base_weight: LLaCA ran as a fixed EMA of weight base_weight, not an adaptive "
            "one. Lower `scale` (alpha = scale * (1 + |g|) / (|p - ema| * |g - g_prev|) came out "
            "at or above 1; with norms='sum' it grows as tensors shrink), or use norms='mean'; "
            "docs/continual.md, 'Choosing settings'")))
    elif kept_share(median_alpha, steps) < MIN_KEPT:
        found.append((TOO_SLOW, (
            f"llaca_optim: the median alpha was {median_alpha:.3g} in a task of {steps} steps: "
            f"the EMA follows the weights over about {1 / max(median_alpha, 1e-30):.3g} steps, "
            f"so end_task keeps only {kept_share(median_alpha, steps):.0%} of what the task "
            "moved the weights (the task is mostly not learned). "
            + ("Lower `horizon` below the task's length" if horizon else "Raise `scale`")
            + " for an EMA that follows within a task; docs/continual.md, 'Choosing settings'")))
    return found
