"""The methods compared by the continual suite, each a factory ``params -> optimizer``.

* ``AdamW``: sequential fine-tuning, a fresh AdamW per task.
* ``AdamW + EMA(0.99)``: AdamW with a fixed-weight EMA of the weights, which replaces them at the
  end of each task (the same task boundary as LLaCA, with a constant weight 0.01 instead of
  LLaCA's per-tensor, per-step one). Written here independently of llaca_optim.
* ``LLaCAAdamW coin`` / ``continual-next``: the two presets of the published update (scale
  2.0 / 0.01, base weight 0.01 / 0.001).
* ``LLaCAAdamW coin-mean``: the size-invariant balance weight (``norms="mean"``), calibrated to
  coin's alpha at the published recipe's tensor size (llaca_optim/presets.py).
* a sweep over ``scale`` x ``base_weight`` that shows the stability-plasticity trade-off.
"""

from __future__ import annotations

from typing import Callable

import torch

import llaca_optim
from llaca_optim.presets import PRESETS

Factory = Callable[[object], torch.optim.Optimizer]


class AdamWWithFixedEMA:
    """AdamW, then ema <- ema + w (p - ema) after every step; ``end_task`` puts the EMA into the
    weights and starts the next task with fresh AdamW state and a new EMA."""

    backend = "torch (fused) + foreach EMA"

    def __init__(self, params, lr: float, weight: float = 0.01) -> None:
        self.params = [p for p in params]
        self.lr, self.weight = lr, weight
        self._fresh()

    def _fresh(self) -> None:
        self.inner = torch.optim.AdamW(self.params, lr=self.lr, fused=True)
        self.ema: list[torch.Tensor] | None = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.inner.step(closure)
        if self.ema is None:  # taken after the first step, like LLaCA's
            self.ema = [p.detach().clone() for p in self.params]
        else:
            torch._foreach_lerp_(self.ema, [p.detach() for p in self.params], self.weight)

    @torch.no_grad()
    def end_task(self) -> None:
        if self.ema is not None:
            for p, e in zip(self.params, self.ema):
                p.copy_(e.to(p.dtype))
        self._fresh()


SWEEP = [(scale, base) for scale in (0.1, 2.0, 50.0) for base in (0.003, 0.01, 0.03)]


def methods(lr: float, backend: str = "auto", sweep: bool = True,
            grid: list[tuple[float, float]] | None = None) -> list[tuple[str, dict, Factory]]:
    """(name, settings, factory) of every method, baselines first; ``grid`` is the sweep's list
    of (scale, base_weight)."""
    out: list[tuple[str, dict, Factory]] = [
        ("AdamW", {}, lambda ps: torch.optim.AdamW(ps, lr=lr, fused=True)),
        ("AdamW + EMA(0.99)", {"ema_weight": 0.01}, lambda ps: AdamWWithFixedEMA(ps, lr)),
        ("LLaCAAdamW coin", {"scale": 2.0, "base_weight": 0.01},
         lambda ps: llaca_optim.LLaCAAdamW(ps, lr=lr, preset="coin", backend=backend)),
        ("LLaCAAdamW continual-next", {"scale": 0.01, "base_weight": 0.001},
         lambda ps: llaca_optim.LLaCAAdamW(ps, lr=lr, preset="continual-next", backend=backend)),
        ("LLaCAAdamW coin-mean", {"scale": PRESETS["coin-mean"].scale, "base_weight": 0.01,
                                  "norms": "mean"},
         lambda ps: llaca_optim.LLaCAAdamW(ps, lr=lr, preset="coin-mean", backend=backend)),
    ]
    if sweep:
        for scale, base_weight in grid if grid is not None else SWEEP:
            out.append((f"LLaCAAdamW scale={scale:g} base={base_weight:g}",
                        {"scale": scale, "base_weight": base_weight},
                        lambda ps, s=scale, b=base_weight: llaca_optim.LLaCAAdamW(
                            ps, lr=lr, scale=s, base_weight=b, backend=backend)))
    return out
