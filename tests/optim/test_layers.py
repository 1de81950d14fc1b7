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
# calls. Every module of the package has its place (test_every_module_has_a_layer), the programs
# and adapters that use the optimizers' public API on top, the leaf utilities at the bottom.
LAYERS = (
    ("__main__.py", "cli.py", "demo.py"),
    ("__init__.py", "integrations/__init__.py", "integrations/huggingface.py",
     "integrations/deepspeed.py"),
    ("optim/__init__.py", "optim/adamw.py", "optim/llaca.py", "optim/base.py"),
    ("optim/plan.py", "optim/inner_check.py"),
    ("optim/deferred.py", "optim/sharded.py", "optim/stale.py", "optim/telemetry.py",
     "optim/zero.py", "state.py"),
    # The functional layer: every op call is built here (step_bucket), for the optimizers' steps
    # and for the public functions over tensor lists.
    ("functional.py", "optim/validation.py"),
    ("ops/__init__.py", "ops/registry.py"),
    # The kernels of each backend, registered (at import) for the ops declared below them.
    ("ops/reference_kernels.py", "ops/native.py", "ops/triton/__init__.py", "ops/triton/launcher.py",
     "ops/triton/kernels.py"),
    ("ops/library.py", "ops/roles.py"),
    ("reference.py", "presets.py", "_build.py", "_version.py"),
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


def _imports(path: Path) -> set[str]:
    """The package modules that ``path`` imports (at the top or inside a function), as paths
    relative to the package."""
    import ast

    module = path.relative_to(PACKAGE).with_suffix("")
    package = list(module.parts[:-1])  # a module's package; an __init__.py's is its own
    found = set()

    def resolve(parts: list[str]) -> str | None:
        base = PACKAGE.joinpath(*parts)
        if base.with_suffix(".py").is_file():
            return base.with_suffix(".py").relative_to(PACKAGE).as_posix()
        if (base / "__init__.py").is_file():
            return (base / "__init__.py").relative_to(PACKAGE).as_posix()
        return None

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "llaca_optim":
                parts = node.module.split(".")[1:]
            else:
                continue
            target = resolve(parts)
            for alias in node.names:  # `from . import validation` names a module
                sub = resolve(parts + [alias.name])
                if sub is not None:
                    found.add(sub)
                elif target is not None:
                    found.add(target)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "llaca_optim":
                    target = resolve(alias.name.split(".")[1:])
                    if target is not None:
                        found.add(target)
    found.discard(path.relative_to(PACKAGE).as_posix())
    return found


def test_every_module_has_a_layer_and_imports_only_below_or_beside_it():
    """Statically, for every module of the package (functional and integrations included): it
    stands in LAYERS, and each package module it imports stands in its own layer or a lower
    one. (The traced test above checks the calls of a step; this one every import.)"""
    modules = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py"))
    assert sorted(LAYER_OF) == modules, set(modules) ^ set(LAYER_OF)
    upward = [(m, t) for m in modules for t in _imports(PACKAGE / m) if LAYER_OF[t] < LAYER_OF[m]]
    assert not upward, upward
