"""A prototype of ``horizon=H``: LLaCA's balance weight calibrated so that its typical value is
1/H at any tensor size, with LLaCA's signal still moving it up and down around that level.

LLaCA's weight for a tensor at a step is ``scale * r`` with the signal ``r = (1 + b) / (a c)``
(``a = |p - ema|_1``, ``b = |g|_1``, ``c = |g - g_prev|_1``). The level of ``r`` falls as a power
of the tensor's size (docs/coin-recipe.md), so one ``scale`` is a different EMA at each size.
Here each tensor keeps a running mean of ``log r`` (two numbers per tensor, which a kernel
would keep on the device beside ``alpha``: no host sync): the mean of the task's steps so far for
its first WINDOW steps, then an EMA of weight 1/WINDOW, so that it follows the signal's level as
the task goes on (the drift from the EMA, and with it the signal, changes over a task). Then

    alpha = min(1/H * r / exp(running mean of log r), ALPHA_MAX)

so that alpha's typical value is 1/H whatever the tensor's size, while a step whose signal is
above its recent level (large gradient, small drift, a steady gradient) blends more, one below it
less. The first step of a task has no previous gradient and blends 1/H; so
does a step whose signal is not finite (``a c = 0``). ``end_task`` puts the EMA into the weights
and starts the statistic afresh, as LLaCA's state.

It runs AdamW (torch's fused) and then the update above tensor by tensor in plain PyTorch: a
prototype for the continual suite, not the fused kernels (which the frontiers decide on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

ALPHA_MAX = 0.5  # a blend that would move the EMA most of the way to p is capped here
WINDOW = 20      # steps: the running mean's memory once the task is that old


@dataclass
class Alphas:
    alphas: Tensor
    fell_back: Tensor


class HorizonLLaCA:
    """AdamW, then the horizon-calibrated LLaCA EMA of every parameter (see the module)."""

    backend = "prototype (torch)"

    def __init__(self, params, lr: float, horizon: float) -> None:
        if not horizon >= 1:
            raise ValueError(f"horizon must be >= 1 (steps), got {horizon!r}")
        self.params = [p for p in params]
        self.lr, self.horizon = lr, float(horizon)
        self._fresh()

    def _fresh(self) -> None:
        self.inner = torch.optim.AdamW(self.params, lr=self.lr, fused=True)
        self.state: list[dict | None] = [None] * len(self.params)
        self._last = torch.full((len(self.params),), -1.0)
        self._fell_back = torch.zeros(len(self.params), dtype=torch.bool)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.inner.step(closure)
        base = 1.0 / self.horizon
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            s = self.state[i]
            if s is None:  # the first step of the task: the EMA starts at the stepped weights
                self.state[i] = {"ema": p.detach().float().clone(), "prev": g.clone(),
                                 "log_mean": 0.0, "count": 0}
                self._last[i], self._fell_back[i] = base, True
                continue
            ema = s["ema"]
            a = float((p.detach().float() - ema).abs().sum(dtype=torch.float64))
            b = float(g.abs().sum(dtype=torch.float64))
            c = float((g - s["prev"]).abs().sum(dtype=torch.float64))
            r = (1.0 + b) / (a * c) if a * c > 0 else math.inf
            if math.isfinite(r) and r > 0:
                log_r = math.log(r)
                s["count"] += 1
                s["log_mean"] += (log_r - s["log_mean"]) / min(s["count"], WINDOW)
                alpha = min(base * math.exp(log_r - s["log_mean"]), ALPHA_MAX)
                fell_back = False
            else:
                alpha, fell_back = base, True
            ema.lerp_(p.detach().float(), alpha)
            s["prev"].copy_(g)
            self._last[i], self._fell_back[i] = alpha, fell_back

    def alphas(self) -> Alphas:
        return Alphas(self._last.clone(), self._fell_back.clone())

    @torch.no_grad()
    def end_task(self) -> None:
        for p, s in zip(self.params, self.state):
            if s is not None:
                p.copy_(s["ema"].to(p.dtype))
        self._fresh()
