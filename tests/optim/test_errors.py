"""Bad input (docs/spec.md section 6): a clear error naming the parameter and the fix, raised before any
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
from support.scenarios import HIDE_EXTENSION


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
            if isinstance(value, torch.Tensor):
                assert torch.equal(flat(after)[pid][key], value), key
            else:  # the step count saved beside an EMA, a number
                assert flat(after)[pid][key] == value, key


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
        ({"norms": "median"}, "norms must be 'sum' .* or 'mean' .*got 'median'"),
        ({"norms": True}, "norms must be 'sum'"),
        ({"backend": "tpu"}, "unknown backend 'tpu'"),
        ({"horizon": 0.5}, "horizon must be a finite number of steps >= 1, got 0.5"),
        ({"horizon": math.inf}, "horizon must be a finite number of steps >= 1"),
        ({"horizon": True}, "horizon must be a finite number of steps >= 1, got True"),
        ({"horizon": "100"}, "horizon must be a finite number of steps >= 1, got '100'"),
        ({"horizon": 100, "scale": 2.0}, "horizon=100 sets the balance weight's level itself, so "
                                         "scale would be ignored .*pass horizon alone"),
        ({"horizon": 100, "base_weight": 0.01, "norms": "mean"},
         "so base_weight and norms would be ignored"),
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
    opt.param_groups[0]["norms"] = "l2"
    with pytest.raises(ValueError, match=r"norms must be .*got 'l2' \(param_groups\[0\]\)"):
        opt.step()
    assert_unchanged(before, model, opt)
    opt.param_groups[0]["norms"] = None
    opt.param_groups[0]["horizon"] = 0
    with pytest.raises(ValueError, match=r"horizon must be .*got 0 \(param_groups\[0\]\)"):
        opt.step()
    assert_unchanged(before, model, opt)
    opt.param_groups[0]["horizon"] = None


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
    """The extension is optional at import. Installed without llaca_optim._C (hidden here
    by an import hook) and unable to build it, the package imports, backend="auto" warns once
    what is missing and falls back to the reference, and backend="cpu" raises saying how."""
    code = HIDE_EXTENSION + (
        "import warnings\n"
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


# Edits of optimizer.state between steps that no step can use (the next step reads the state
# afresh, as torch's optimizers do). Each is made to a bf16 parameter, whose bucket runs after the
# float32 one: a check made per bucket would have stepped the float32 parameters already.
BAD_STATE = {
    "exp_avg of another shape": (lambda st, p: st.__setitem__("exp_avg", torch.zeros(p.numel() + 1)),
                                 r"\['exp_avg'\] of parameter 'd' \(param_groups\[0\]\['params'\]\[3\]\) must be a tensor of the parameter's shape \(3, 2\).*got shape \(7,\)"),
    "exp_avg on another device": (lambda st, p: st.__setitem__("exp_avg", torch.zeros_like(p, device="meta")),
                                  r"\['exp_avg'\].*on cpu.*got shape \(3, 2\), torch.bfloat16 on meta"),
    "exp_avg_sq in float64": (lambda st, p: st.__setitem__("exp_avg_sq", st["exp_avg_sq"].double()),
                              r"\['exp_avg_sq'\].*of dtype torch.bfloat16; got shape \(3, 2\), torch.float64"),
    "exp_avg as None": (lambda st, p: st.__setitem__("exp_avg", None), r"\['exp_avg'\].*got a NoneType"),
    "step as a float": (lambda st, p: st.__setitem__("step", 3.0),
                        r"\['step'\].*must be a one-element torch.float32 tensor on cpu, got a float"),
    "step as an int tensor": (lambda st, p: st.__setitem__("step", torch.tensor(3)),
                              r"\['step'\].*got 1 elements of torch.int64"),
    "alpha of two elements": (lambda st, p: st.__setitem__("alpha", torch.zeros(2)),
                              r"\['alpha'\].*got 2 elements"),
    "ema of another shape": (lambda st, p: st.__setitem__("ema", torch.zeros(6)), r"\['ema'\].*got shape \(6,\)"),
    "ema in an integer dtype": (lambda st, p: st.__setitem__("ema", torch.zeros(3, 2, dtype=torch.int32)),
                                r"\['ema'\].*of dtype one of torch.float32.*got shape \(3, 2\), torch.int32"),
    "prev_grad in float32": (lambda st, p: st.__setitem__("prev_grad", st["prev_grad"].float()),
                             r"\['prev_grad'\].*of dtype torch.bfloat16; got"),
    "exp_avg_sq dropped": (lambda st, p: st.pop("exp_avg_sq"),
                           r"has \['step', 'exp_avg'\] but not \['exp_avg_sq'\], which come with them"),
    "prev_grad dropped": (lambda st, p: st.pop("prev_grad"), r"but not \['prev_grad'\]"),
}
LLACA_ONLY = ("ema of another shape", "ema in an integer dtype", "prev_grad in float32",
              "prev_grad dropped", "alpha of two elements")


def _snapshot(params, opt):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[p].items()}
             for p in params])


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
@pytest.mark.parametrize("edit", list(BAD_STATE) + ["entry not a dict"])
def test_bad_state_edits_raise_and_change_nothing(kind, edit):
    if kind == "wrapper" and edit not in LLACA_ONLY + ("entry not a dict",):
        pytest.skip("the wrapper's state holds only the LLaCA entries")
    shapes_dtypes = [((4,), torch.float32), ((5,), torch.float32), ((2, 2), torch.bfloat16), ((3, 2), torch.bfloat16)]
    params = [nn.Parameter(torch.randn(s, dtype=d)) for s, d in shapes_dtypes]
    named = list(zip("abcd", params))
    opt = (LLaCAAdamW(named, lr=1e-2) if kind == "fused"
           else LLaCA(torch.optim.SGD(named, lr=0.1)))
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    target = params[3]
    if edit == "entry not a dict":
        opt.state[target] = 5
        pattern = r"optimizer.state\[param\] of parameter 'd' .* is a int, not a dict"
    else:
        change, pattern = BAD_STATE[edit]
        change(opt.state[target], target)
    kept = [p for p in params if p is not target]
    before = _snapshot(kept, opt)
    before_target = target.detach().clone()
    with pytest.raises((RuntimeError, TypeError), match=pattern):
        opt.step()
    after = _snapshot(kept, opt)
    assert torch.equal(target.detach(), before_target)
    for i, (x, y) in enumerate(zip(before[0], after[0])):
        assert torch.equal(x, y), f"param {i} changed"
    for i, (x, y) in enumerate(zip(before[1], after[1])):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f"state {i} changed"
    del opt.state[target]  # what the message says: the parameter starts afresh, the step runs
    opt.step()
    assert "ema" in opt.state[target]


@pytest.mark.parametrize("ema_dtype", [torch.float64, torch.float16])
def test_ema_dtype_the_kernels_lack_runs_through_the_reference(cpu_backend, ema_dtype):
    """An EMA neither float32 nor in the parameter's dtype (ema_dtype=torch.float64 for float32
    parameters, float16 for bfloat16 ones) is updated by the reference, bit for bit."""
    dtype = torch.float32 if ema_dtype == torch.float64 else torch.bfloat16
    a = [nn.Parameter(torch.randn(s, dtype=dtype)) for s in [(6, 3), (7,)]]
    b = [nn.Parameter(p.detach().clone()) for p in a]
    ours = LLaCAAdamW(a, lr=1e-2, ema_dtype=ema_dtype, backend=cpu_backend)
    oracle = LLaCAAdamW(b, lr=1e-2, ema_dtype=ema_dtype, backend="reference")
    for _ in range(4):
        for p, q in zip(a, b):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        ours.step()
        oracle.step()
    for p, q in zip(a, b):
        assert ours.state[p]["ema"].dtype == ema_dtype
        assert torch.equal(p, q)
        for key, value in oracle.state[q].items():
            assert torch.equal(ours.state[p][key], value), key
