"""An optimizer's whole state, copied and compared: every parameter, every state tensor (the
wrapper's and its inner optimizer's) and every group option; and the small model, the two
optimizers and the training loops that the state and task-API tests step them with (fresh random
data, given batches, or given gradients for a twin)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from llaca_optim import LLaCA, LLaCAAdamW
from support.compare import assert_equal


def make_model(dtype=torch.float32) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 3)).to(dtype)


def make_optimizer(kind, params, backend="auto", inner=None, **kw):
    """``kind`` "fused": LLaCAAdamW; "wrapper": LLaCA around ``inner(params)`` (default SGD with
    momentum, whose state LLaCA's does not share a key with)."""
    if kind == "fused":
        return LLaCAAdamW(params, lr=1e-2, backend=backend, **kw)
    inner = inner or (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    return LLaCA(inner(params), backend=backend, **kw)


def run_steps(model, optimizer, data):
    """One step per batch of ``data``."""
    for x in data:
        optimizer.zero_grad()
        model(x).float().pow(2).mean().backward()
        optimizer.step()


def train(model, optimizer, steps, grads=None):
    """``steps`` steps on fresh random data; returns the gradients used, so that a twin can be
    fed the same ones (``grads``)."""
    used = []
    width = next(m for m in model.modules() if isinstance(m, nn.Linear)).in_features
    for i in range(steps):
        optimizer.zero_grad()
        if grads is None:
            model(torch.randn(5, width, dtype=next(model.parameters()).dtype)).float().pow(2).mean().backward()
            used.append([p.grad.clone() for p in model.parameters()])
        else:
            for p, g in zip(model.parameters(), grads[i]):
                p.grad = g.clone()
        optimizer.step()
    return used


def everything(model, optimizer):
    """Every parameter, every state tensor (the wrapper's and its inner optimizer's) and every
    group option, copied."""
    optimizer.flush_ema()
    inner = getattr(optimizer, "optimizer", None)
    states = [optimizer.state] + ([inner.state] if inner is not None else [])
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return copy.deepcopy({
        "params": [p.detach().clone() for p in model.parameters()],
        "state": [{k: v for k, v in s.get(p, {}).items()} for s in states for p in model.parameters()],
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups],
        "group_params": [[index.get(id(p)) for p in g["params"]] for g in optimizer.param_groups],
    })


def assert_same(before, after):
    assert before["groups"] == after["groups"]
    assert before["group_params"] == after["group_params"]
    for i, (x, y) in enumerate(zip(before["params"], after["params"])):
        assert_equal(y, x, what=f"param {i}")
    assert len(before["state"]) == len(after["state"])
    for i, (x, y) in enumerate(zip(before["state"], after["state"])):
        assert x.keys() == y.keys(), f"state {i}"
        for key in x:
            if isinstance(x[key], torch.Tensor):
                assert_equal(y[key], x[key], what=f"state {i} {key}")
            else:
                assert x[key] == y[key], f"state {i} {key}"
