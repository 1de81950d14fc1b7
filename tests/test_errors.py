"""Bad input (SPEC section 6): a clear error naming the parameter and the fix, raised before any
state changes. Non-finite gradients are not an error (tested in test_parity.py)."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import llaca_optim
from llaca_optim import LLaCA, LLaCAAdamW


def trained(kind="fused"):
    model = nn.Sequential(nn.Linear(5, 6), nn.Linear(6, 2))
    params = list(model.named_parameters())
    opt = LLaCAAdamW(params, lr=1e-2) if kind == "fused" else LLaCA(torch.optim.SGD([p for _, p in params], lr=0.1))
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(3, 5)).sum().backward()
        opt.step()
    return model, opt


def frozen_copy(model, opt):
    return copy.deepcopy(([p.detach().clone() for p in model.parameters()], opt.state_dict()))


def assert_unchanged(before, model, opt):
    params, state = before
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p.detach(), q)
    after = opt.state_dict()
    flat = lambda sd: sd.get("llaca", sd)["state"]  # noqa: E731
    for pid, entry in flat(state).items():
        for key, value in entry.items():
            assert torch.equal(flat(after)[pid][key], value), key


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
@pytest.mark.parametrize(
    "corrupt, pattern",
    [
        (lambda g: torch.zeros(7, 7), r"shape \(7, 7\).*fix whatever wrote \.grad"),
        (lambda g: g.double(), r"dtype torch.float64.*cast the gradient"),
    ],
    ids=["shape", "dtype"],
)
def test_bad_gradients_raise_and_change_nothing(kind, corrupt, pattern):
    model, opt = trained(kind)
    before = frozen_copy(model, opt)
    opt.zero_grad()
    model(torch.randn(3, 5)).sum().backward()
    bad = model[1].weight
    # `p.grad = x` checks shape and dtype; `p.grad.data = x` does not: a buggy hook can do this.
    bad.grad.data = corrupt(bad.grad)
    with pytest.raises(RuntimeError, match=pattern) as info:
        opt.step()
    assert "param_groups[0]['params'][2]" in str(info.value)
    if kind == "fused":
        assert "'1.weight'" in str(info.value), "named parameters are named in the error"
    assert_unchanged(before, model, opt)


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_sparse_gradients_are_refused(kind):
    embedding = nn.Embedding(10, 4, sparse=True)
    opt = (LLaCAAdamW(embedding.parameters()) if kind == "fused"
           else LLaCA(torch.optim.SGD(embedding.parameters(), lr=0.1)))
    weight = embedding.weight.detach().clone()
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradient.*sparse=False"):
        opt.step()
    assert torch.equal(embedding.weight.detach(), weight) and not opt.state


def test_complex_parameters_are_refused():
    p = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = LLaCAAdamW([p])
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex.*view_as_real"):
        opt.step()
    assert not opt.state


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"lr": -1.0}, "lr must be finite and >= 0"),
        ({"lr": math.nan}, "lr must be finite"),
        ({"eps": -1e-8}, "eps must be finite and >= 0"),
        ({"weight_decay": math.inf}, "weight_decay must be finite"),
        ({"betas": (1.0, 0.999)}, r"betas\[0\] must lie in \[0, 1\)"),
        ({"betas": (0.9, -0.1)}, r"betas\[1\] must lie in \[0, 1\)"),
        ({"preset": "nope"}, "unknown preset 'nope'.*continual-next"),
        ({"scale": 0.0}, "scale must be a finite number > 0"),
        ({"scale": -2.0}, "scale must be a finite number > 0"),
        ({"scale": math.inf}, "scale must be a finite number > 0"),
        ({"base_weight": 0.0}, r"base_weight must lie in \(0, 1\]"),
        ({"base_weight": 1.5}, r"base_weight must lie in \(0, 1\]"),
        ({"ema_dtype": torch.int8}, "ema_dtype must be"),
        ({"backend": "tpu"}, "unknown backend 'tpu'"),
    ],
)
def test_bad_hyperparameters(kwargs, pattern):
    p = nn.Parameter(torch.randn(3))
    with pytest.raises((ValueError, TypeError), match=pattern):
        LLaCAAdamW([p], **kwargs)
    if "backend" not in kwargs and not set(kwargs) & {"lr", "eps", "weight_decay", "betas"}:
        with pytest.raises((ValueError, TypeError), match=pattern):
            LLaCA(torch.optim.SGD([p], lr=0.1), **kwargs)


def test_bad_group_edits_are_caught_at_step_and_add_param_group():
    model, opt = trained()
    before = frozen_copy(model, opt)
    opt.param_groups[0]["scale"] = -1.0
    opt.zero_grad()
    model(torch.randn(3, 5)).sum().backward()
    with pytest.raises(ValueError, match=r"scale must be .* \(param_groups\[0\]\)"):
        opt.step()
    assert_unchanged(before, model, opt)
    opt.param_groups[0]["scale"] = None
    groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=r"base_weight .* \(param_groups\[1\]\)"):
        opt.add_param_group({"params": [("extra", nn.Parameter(torch.randn(2)))], "base_weight": 2.0})
    assert len(opt.param_groups) == groups


def test_unavailable_backend_says_why():
    p = nn.Parameter(torch.randn(3))
    with pytest.raises(llaca_optim.BackendUnavailable, match="backend 'cuda' is not available: .*"):
        LLaCAAdamW([p], backend="cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_triton_without_gpu_or_interpreter_says_how():
    code = (
        "import torch, llaca_optim\n"
        "try:\n"
        "    llaca_optim.LLaCAAdamW([torch.nn.Parameter(torch.randn(3))], backend='triton')\n"
        "except llaca_optim.BackendUnavailable as e:\n"
        "    print(e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert "backend 'triton' is not available" in out.stdout, out.stdout + out.stderr
    assert "TRITON_INTERPRET=1" in out.stdout or "pip install triton" in out.stdout


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_state_dict_from_another_layout_fails_and_changes_nothing(kind):
    model, opt = trained(kind)
    other_model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2))
    other = (LLaCAAdamW(other_model.parameters()) if kind == "fused"
             else LLaCA(torch.optim.SGD(other_model.parameters(), lr=0.1)))
    other_model(torch.randn(3, 5)).sum().backward()
    other.step()
    before = frozen_copy(model, opt)
    with pytest.raises(ValueError, match="different model layout|same parameters"):
        opt.load_state_dict(other.state_dict())
    assert_unchanged(before, model, opt)
    fewer = nn.Linear(5, 6)
    with pytest.raises(ValueError, match="has 2 parameters but this optimizer's has 4"):
        (LLaCAAdamW(model.parameters()) if kind == "fused" else LLaCA(torch.optim.SGD(model.parameters(), lr=0.1))).load_state_dict(
            (LLaCAAdamW(fewer.parameters()) if kind == "fused" else LLaCA(torch.optim.SGD(fewer.parameters(), lr=0.1))).state_dict()
        )


@pytest.mark.parametrize("missing", ["no JIT allowed", "no compiler"])
def test_package_without_native_kernels_imports_warns_once_and_uses_the_reference(missing):
    """STYLE 4: the extension is optional at import. Installed without llaca_optim._C (hidden here
    by an import hook) and unable to build it, the package imports, backend="auto" warns once
    what is missing and falls back to the reference, and backend="cpu" raises saying how."""
    code = (
        "import importlib.abc, sys, warnings\n"
        "class Hide(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name == 'llaca_optim._C':\n"
        "            raise ImportError('llaca_optim._C hidden by the test')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torch, llaca_optim\n"
        "ok, why = llaca_optim.backend_status()['cpu']\n"
        "print('status', ok, why)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    model = torch.nn.Linear(4, 3)\n"
        "    opt = llaca_optim.LLaCAAdamW(model.parameters(), backend='auto')\n"
        "    second = llaca_optim.LLaCAAdamW(torch.nn.Linear(2, 2).parameters())\n"
        "    for _ in range(3):\n"
        "        model(torch.randn(8, 4)).pow(2).mean().backward()\n"
        "        opt.step()\n"
        "        opt.zero_grad()\n"
        "print('backends', opt.backend, second.backend)\n"
        "print('warnings', len([w for w in caught if 'llaca_optim' in str(w.message)]))\n"
        "print('ema', opt.ema(model.weight) is not None)\n"
        "try:\n"
        "    llaca_optim.LLaCAAdamW(model.parameters(), backend='cpu')\n"
        "except llaca_optim.BackendUnavailable as e:\n"
        "    print('error', e)\n"
    )
    env = dict(os.environ)
    if missing == "no JIT allowed":
        env["LLACA_NO_JIT"] = "1"
    else:
        env.pop("LLACA_NO_JIT", None)
        env["CXX"] = "/nonexistent/c++"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    fix = ("LLACA_NO_JIT=1 forbids building" if missing == "no JIT allowed"
           else "no C++ compiler was found")
    assert "status False" in out and fix in out, out
    assert "backends reference reference" in out and "warnings 1" in out and "ema True" in out, out
    assert "error llaca_optim: backend 'cpu' is not available" in out and "pip install" in out, out
