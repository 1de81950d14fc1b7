"""Task family (c): permuted digits through LoRA factors of the published recipe's size.

The balance weight depends on tensor size (docs/coin-recipe.md): at the recipe's rank-128 LoRA
factors of 4096-wide layers (524,288 elements) `coin`'s alpha is adaptive and about 0.002, where
the tiny models of families (a) and (b) have alphas of 0.01 or 0.3 to 0.9. This family puts LLaCA
in the recipe's regime at a CPU's cost: the permuted-digits tasks of family (b), learnt by an MLP
64 -> 4096 -> 4096 -> 10 whose two hidden layers are frozen after a pre-training and adapted by
rank-128 LoRA (A: 128 x in, B: out x 128, B starting at zero, scaling lora_alpha / r = 2, as the
recipe's 256 / 128), with the classifier head trained in full (as the recipe trains its
projector). The pre-training learns the digits through a permutation of their own, unlike any
task's, and is shared by every method of a seed. Learning rate 2e-4 (the recipe's), batch 64.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from llaca_optim import demo


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update, as peft's LoRA."""

    def __init__(self, base: nn.Linear, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(rank, base.in_features, generator=generator)
                                   / math.sqrt(base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scaling = 2.0

    def forward(self, x):
        return self.base(x) + (x @ self.lora_A.T) @ self.lora_B.T * self.scaling


@dataclass
class Base:
    """A seed's pre-trained MLP, shared by every method of that seed."""

    seed: int
    state: dict


def pretrain(seed: int, width: int, steps: int) -> Base:
    x, y = demo.load_tasks(1, seed)[0][0]
    generator = torch.Generator().manual_seed(1000 + seed)
    view = torch.randperm(64, generator=generator)  # the pre-training's own permutation
    model = demo.make_model(seed, width)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        batch = torch.randint(0, len(y), (64,), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x[batch][:, view]), y[batch]).backward()
        optimizer.step()
    return Base(seed, {k: v.clone() for k, v in model.state_dict().items()})


def lr_factor(step: int, steps: int, schedule: str, warmup: float) -> float:
    """The learning rate's factor at ``step`` (0-based) of a task of ``steps``: ``constant``, or
    the published recipe's ``cosine`` (a linear warm-up over the first ``warmup`` share of the
    steps, then a cosine decay to zero), restarted at every task as the recipe restarts its run."""
    if schedule == "constant":
        return 1.0
    ramp = max(1, math.ceil(warmup * steps))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1.0 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


def _groups(optimizer):
    """The param groups an optimizer of the suite steps with (its own, or its inner AdamW's)."""
    groups = getattr(optimizer, "param_groups", None)
    return groups if groups is not None else optimizer.inner.param_groups


def run(method_name: str, make_optimizer, base: Base, tasks: int, steps: int, width: int,
        rank: int, progress, schedule: str = "constant", warmup: float = 0.03) -> demo.Result:
    model = demo.make_model(base.seed, width)
    model.load_state_dict(base.state)
    generator = torch.Generator().manual_seed(base.seed + 1)
    model[0] = LoRALinear(model[0], rank, generator)
    model[2] = LoRALinear(model[2], rank, generator)
    trainable = [p for p in model.parameters() if p.requires_grad]
    args = argparse.Namespace(seed=base.seed, steps=steps, batch=64, width=width)
    data = demo.load_tasks(tasks, base.seed)
    matrix, step_times, optimizer = [], [], None
    for t, (train, _) in enumerate(data):
        if optimizer is None or not hasattr(optimizer, "end_task"):
            optimizer = make_optimizer(trainable)  # fresh state per task, as the recipe does
        x, y = train
        peak = [group["lr"] for group in _groups(optimizer)]
        for step in range(args.steps):
            for group, lr in zip(_groups(optimizer), peak):
                group["lr"] = lr * lr_factor(step, args.steps, schedule, warmup)
            batch = torch.randint(0, len(y), (args.batch,), generator=generator)
            optimizer.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
            start = time.perf_counter()
            optimizer.step()
            step_times.append(time.perf_counter() - start)
            progress.update(1)
        for group, lr in zip(_groups(optimizer), peak):
            group["lr"] = lr  # the next task's schedule starts from the peak again
        if hasattr(optimizer, "end_task"):
            optimizer.end_task()
        matrix.append([demo.accuracy(model, data[j][1]) for j in range(t + 1)])
    backend = str(getattr(optimizer, "backend", "torch (fused)"))
    return demo.Result(method_name, matrix, 1e3 * statistics.median(step_times), backend)
