"""A step goes down the layers and never comes back up (docs/architecture.md): traced call by
call, no function of the package is called from a layer below its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import llaca_optim
from llaca_optim import LLaCA, LLaCAAdamW
from support.backends import backends

PACKAGE = Path(llaca_optim.__file__).resolve().parent
# Top down; modules of one layer may call each other. An optimizer's class and the base class it
# shares with the other are one layer: one object, whose hooks (_parts, _validate_group) the base
# calls.
LAYERS = (
    ("optim/adamw.py", "optim/llaca.py", "optim/base.py"),
    ("optim/plan.py",),
    ("optim/deferred.py", "optim/sharded.py", "optim/validation.py", "optim/stale.py",
     "optim/telemetry.py", "state.py", "integrations/deepspeed.py"),
    ("ops/registry.py",),
    ("ops/library.py", "ops/roles.py"),
    ("ops/reference.py", "ops/native.py", "ops/triton/__init__.py", "ops/triton/launcher.py"),
    ("reference.py", "presets.py"),
)
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


def module_of(frame) -> str | None:
    path = Path(frame.f_code.co_filename)
    try:
        return path.resolve().relative_to(PACKAGE).as_posix()
    except ValueError:
        return None


def trace(action) -> tuple[list[tuple[str, str, str]], int]:
    """Runs ``action``; returns every call into the package made from a lower layer (caller
    module, callee module, callee function) and the number of calls that cross from one package
    module into another."""
    upward, crossings = [], 0

    def profile(frame, event, arg):
        nonlocal crossings
        if event != "call":
            return
        callee = module_of(frame)
        if callee is None:
            return
        caller_frame = frame.f_back
        while caller_frame is not None and module_of(caller_frame) is None:
            caller_frame = caller_frame.f_back  # through torch (the dispatcher, no_grad, ...)
        if caller_frame is None:
            return
        caller = module_of(caller_frame)
        if caller != callee:
            crossings += 1
            assert callee in LAYER_OF and caller in LAYER_OF, f"a module outside LAYERS: {caller} -> {callee}"
            if LAYER_OF[caller] > LAYER_OF[callee]:
                upward.append((caller, callee, frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        action()
    finally:
        sys.setprofile(None)
    return upward, crossings


@pytest.mark.parametrize("backend", backends("reference", "cpu"), indirect=True)
@pytest.mark.parametrize("kind", ["LLaCAAdamW", "LLaCA(SGD)"])
def test_a_step_goes_down_the_layers(kind, backend):
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Linear(5, 2))
    params = list(model.parameters())
    if kind == "LLaCAAdamW":
        optimizer = LLaCAAdamW(params, lr=1e-2, backend=backend)
    else:
        optimizer = LLaCA(torch.optim.SGD(params, lr=1e-2), backend=backend)

    def step():
        model(torch.randn(3, 6)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # first step: state made; the traced ones plan anew (a new layout) and reuse it
    params[0].grad = None
    upward, crossings = trace(lambda: (step(), step(), optimizer.ema(params[1]), optimizer.state_dict()))
    assert not upward, upward
    assert crossings > 0
    print(f"{kind}: {crossings} calls from one module into another, none upward")
