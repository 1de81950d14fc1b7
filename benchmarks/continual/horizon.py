"""The prototype of ``horizon=H`` that the frontiers ran before the knob was in the library
(``LLaCAAdamW(horizon=H)``, NOTE [horizon] in llaca_optim/optim/sharded.py, which steps as this
does: tests/programs/test_frontier.py): LLaCA's balance weight calibrated so that its typical
value is 1/H at any tensor size, with LLaCA's signal still moving it up and down around that
level.

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

from .methods import AdamWWithFixedEMA

ALPHA_MAX = 0.5  # a blend that would move the EMA most of the way to p is capped here
WINDOW = 20      # steps: the running mean's memory once the task is that old


@dataclass
class Alphas:
    alphas: Tensor
    fell_back: Tensor


class HorizonLLaCA(AdamWWithFixedEMA):
    """The fixed-EMA baseline of the suite (methods.py: AdamW, then an EMA of the weights put
    into them at each task's end) with each tensor's weight set per step as the module says."""

    backend = "prototype (torch)"

    def __init__(self, params, lr: float, horizon: float) -> None:
        if not horizon >= 1:
            raise ValueError(f"horizon must be >= 1 (steps), got {horizon!r}")
        self.horizon = float(horizon)
        super().__init__(params, lr, weight=1.0 / self.horizon)

    def _fresh(self) -> None:
        super()._fresh()
        n = len(self.params)
        self.prev: list[Tensor | None] = [None] * n
        self.log_mean, self.count = [0.0] * n, [0] * n
        self._last = torch.full((n,), -1.0)
        self._fell_back = torch.zeros(n, dtype=torch.bool)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        self.inner.step(closure)
        if self.ema is None:  # the first step of the task: the EMA starts at the stepped weights
            self.ema = [p.detach().float().clone() for p in self.params]
        for i, (p, ema) in enumerate(zip(self.params, self.ema)):
            if p.grad is None:
                continue
            g = p.grad.detach().float()
            alpha, fell_back = self.weight, True
            if self.prev[i] is not None:
                a = float((p.detach().float() - ema).abs().sum(dtype=torch.float64))
                b = float(g.abs().sum(dtype=torch.float64))
                c = float((g - self.prev[i]).abs().sum(dtype=torch.float64))
                r = (1.0 + b) / (a * c) if a * c > 0 else math.inf
                if math.isfinite(r) and r > 0:
                    self.count[i] += 1
                    self.log_mean[i] += (math.log(r) - self.log_mean[i]) / min(self.count[i], WINDOW)
                    alpha = min(self.weight * math.exp(math.log(r) - self.log_mean[i]), ALPHA_MAX)
                    fell_back = False
                ema.lerp_(p.detach().float(), alpha)
            self.prev[i] = g.clone()
            self._last[i], self._fell_back[i] = alpha, fell_back

    def alphas(self) -> Alphas:
        return Alphas(self._last.clone(), self._fell_back.clone())
