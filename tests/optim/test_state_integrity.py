"""State that must not be lost or corrupted: state dicts taken inside ``ema_weights()``, a
parameter listed twice or tensors sharing memory, parameters on the meta device, loads of state
dicts with wrong inner state or missing group options, groups added through the wrapper's inner
optimizer. Each bad call raises naming the parameter and the fix, and changes nothing: every
parameter, every state tensor and every group option is snapshotted before it and compared
after."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from support.compare import assert_equal
from support.state import assert_same, everything, make_model, make_optimizer, train
from llaca_optim import LLaCA, LLaCAAdamW
from support.backends import backends

KINDS = ["fused", "wrapper"]


# ---------------------------------------------------------------- state dicts inside the swap

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", backends("cpu", "reference"), indirect=True)
def test_state_dict_inside_ema_weights_is_the_true_state(kind, dtype, backend):
    """Inside ``ema_weights()`` the parameters hold the EMA; a state dict taken there holds the
    true EMAs (not the live weights) and the live weights, and a model saved there (the EMA
    weights) plus that state dict resume training bit for bit."""
    model = make_model(dtype)
    optimizer = make_optimizer(kind, model.parameters(), backend)
    train(model, optimizer, 4)
    outside = copy.deepcopy(optimizer.state_dict())
    live = [p.detach().clone() for p in model.parameters()]
    with optimizer.ema_weights():
        inside = copy.deepcopy(optimizer.state_dict())
        model_file = copy.deepcopy(model.state_dict())  # the EMA weights
    for i, p in enumerate(model.parameters()):
        assert_equal(p, live[i], what=f"param {i} restored")
    flat = lambda sd: sd["llaca"] if kind == "wrapper" else sd  # noqa: E731
    for pid, entry in flat(outside)["state"].items():
        saved = flat(inside)["state"][pid]
        assert saved.keys() == entry.keys() | {"live_param"}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert_equal(saved[key], value, what=f"{pid} {key}")
            else:  # the step count saved beside the EMA
                assert saved[key] == value, f"{pid} {key}"
        assert_equal(saved["live_param"], live[pid], what=f"{pid} live weights")

    # Resume as the Trainer does: the model's weights (here the EMA) first, then the optimizer.
    resumed_model = make_model(dtype)
    resumed_model.load_state_dict(model_file)
    resumed = make_optimizer(kind, resumed_model.parameters(), backend)
    resumed.load_state_dict(inside)
    assert all("live_param" not in s for s in resumed.state.values())
    grads = train(model, optimizer, 3)
    train(resumed_model, resumed, 3, grads)
    assert_same(everything(model, optimizer), everything(resumed_model, resumed))


# ---------------------------------------------------------------- a parameter twice, shared memory

@pytest.mark.filterwarnings("ignore:optimizer contains a parameter group with duplicate")  # torch's SGD
@pytest.mark.parametrize("kind", KINDS)
def test_a_parameter_listed_twice_is_refused(kind):
    q = nn.Parameter(torch.randn(8, 5))
    with pytest.raises(ValueError, match=r"params'\]\[1\]\) is the same tensor as .*\[0\]\); pass each parameter once"):
        make_optimizer(kind, [q, q])
    r = nn.Parameter(torch.randn(3))
    optimizer = make_optimizer(kind, [r])
    with pytest.raises(ValueError, match="pass each parameter once"):
        optimizer.add_param_group({"params": [q, q]})
    assert len(optimizer.param_groups) == 1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", backends("cpu", "reference"), indirect=True)
def test_a_parameter_put_twice_into_a_group_is_refused_at_the_step(kind, backend):
    """Over 2^18 elements the CPU kernels split a tensor over threads: the same tensor twice in
    one step gave a different result on every run. Put there after construction, it is refused
    by the step, before anything changes."""
    model = nn.Sequential(nn.Linear(600, 500))
    optimizer = make_optimizer(kind, model.parameters(), backend)
    train_wide(model, optimizer)
    before = everything(model, optimizer)
    optimizer.param_groups[0]["params"].append(model[0].weight)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    with pytest.raises(ValueError, match=r"\[2\]\) is the same tensor as parameter \(param_groups\[0\]\['params'\]\[0\]\)"):
        optimizer.step()
    optimizer.param_groups[0]["params"].pop()
    assert_same(before, everything(model, optimizer))


def train_wide(model, optimizer):
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()


SHARING = {
    "two parameters over one storage": "params",
    "one exp_avg for two parameters": "exp_avg",
    "a gradient that is its parameter": "grad",
    "ema and prev_grad one tensor": "ema",
}


@pytest.mark.parametrize("case", list(SHARING))
@pytest.mark.parametrize("backend", backends("cpu", "reference"), indirect=True)
def test_tensors_sharing_memory_are_refused(case, backend):
    base = torch.randn(2, 50)
    if case == "two parameters over one storage":
        params = [nn.Parameter(base[0]), nn.Parameter(base[0, 10:40])]
    else:
        params = [nn.Parameter(base[0].clone()), nn.Parameter(base[1].clone())]
    optimizer = LLaCAAdamW(params, lr=1e-2, backend=backend)
    if case not in ("two parameters over one storage", "a gradient that is its parameter"):
        for _ in range(2):
            for p in params:
                p.grad = torch.randn_like(p)
            optimizer.step()
    a, b = params
    if case == "one exp_avg for two parameters":
        optimizer.state[b]["exp_avg"] = optimizer.state[a]["exp_avg"]
        pattern = r"\['exp_avg'\] of parameter \(param_groups\[0\]\['params'\]\[1\]\) shares memory with .*\['exp_avg'\] of parameter \(param_groups\[0\]\['params'\]\[0\]\)"
    elif case == "ema and prev_grad one tensor":
        optimizer.state[b]["prev_grad"] = optimizer.state[b]["ema"]
        pattern = r"\['prev_grad'\] of .*\[1\]\) shares memory with .*\['ema'\] of .*\[1\]\)"
    elif case == "a gradient that is its parameter":
        pattern = r"its gradient of .*\[1\]\) shares memory with the parameter of .*\[1\]\)"
    else:
        pattern = r"the parameter of .*\[1\]\) shares memory with the parameter of .*\[0\]\).*writes both"
    before = ([p.detach().clone() for p in params],
              [copy.deepcopy(dict(optimizer.state.get(p, {}))) for p in params])
    for p in params:
        p.grad = torch.randn_like(p)
    if case == "a gradient that is its parameter":
        b.grad = b.detach()
    with pytest.raises(RuntimeError, match=pattern + ".*own tensor"):
        optimizer.step()
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), before[0][i])
        assert optimizer.state.get(p, {}).keys() == before[1][i].keys()
        for key, value in before[1][i].items():
            assert torch.equal(optimizer.state[p][key], value), key


@pytest.mark.parametrize("backend", backends("cpu", "reference"), indirect=True)
def test_one_gradient_for_two_parameters_is_allowed(backend):
    """Gradients are only read: two parameters may share one (it is not refused), and the step
    is the one they take from two copies of it."""
    params = [nn.Parameter(torch.randn(40)) for _ in range(2)]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    ours = LLaCAAdamW(params, lr=1e-2, backend=backend)
    oracle = LLaCAAdamW(twins, lr=1e-2, backend=backend)
    for _ in range(3):
        g = torch.randn(40)
        params[0].grad = params[1].grad = g
        for q in twins:
            q.grad = g.clone()
        ours.step()
        oracle.step()
    for p, q in zip(params, twins):
        assert_equal(p, q, what="param")
        for key, value in oracle.state[q].items():
            assert_equal(ours.state[p][key], value, what=key)


# ---------------------------------------------------------------- meta parameters

@pytest.mark.parametrize("kind", ["fused", "LLaCA(AdamW)"])
def test_meta_parameters_step_and_make_the_state_a_real_step_makes(kind):
    """Deferred-init and shape-tracing tools step optimizers over meta parameters, as torch's
    AdamW allows: the step runs and makes the state, with the shapes, dtypes and keys a step on
    the CPU makes; the task API works there too."""
    def build(device):
        model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2).to(torch.bfloat16)).to(device)
        if kind == "fused":
            return model, LLaCAAdamW(model.parameters(), lr=1e-2)
        return model, LLaCA(torch.optim.AdamW(model.parameters(), lr=1e-2))
    results = {}
    for device in ("cpu", "meta"):
        model, optimizer = build(device)
        if device == "meta":
            assert optimizer.backend == "reference"
        for _ in range(2):
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
            optimizer.step()
        with optimizer.ema_weights():
            pass
        saved = optimizer.state_dict()
        saved = saved.get("llaca", saved)
        results[device] = [{k: (tuple(v.shape), v.dtype) for k, v in optimizer.state[p].items()}
                           for p in model.parameters()]
        assert all(v.device.type == device for s in optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor) and v.dim() > 0)
        optimizer.end_task()
        assert not optimizer.state
        assert saved["state"]
    assert results["meta"] == results["cpu"]


def test_meta_parameters_with_a_cpu_only_backend_are_refused_at_construction(cpu_backend):
    p = nn.Parameter(torch.empty(3, device="meta"))
    with pytest.raises(RuntimeError, match="runs on cpu tensors, but these parameters are on meta"):
        LLaCAAdamW([p], backend=cpu_backend)


# ---------------------------------------------------------------- loading state dicts

INNER = {
    "SGD(momentum)": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "Adam(amsgrad)": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "RMSprop(centered)": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.5, centered=True),
}


def _wrapped(inner):
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 5))  # (3, 4), (3,), (5, 3), (5,)
    optimizer = LLaCA(INNER[inner](model.parameters()))
    for _ in range(2):
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        optimizer.step()
    return model, optimizer


def _parameter_shaped_key(state_dict, pid):
    return next(k for k, v in state_dict["inner"]["state"][pid].items()
                if isinstance(v, torch.Tensor) and v.dim() > 0)


@pytest.mark.parametrize("inner", list(INNER))
@pytest.mark.parametrize("corruption", ["wrong shape", "swapped between parameters", "a moment dropped",
                                        "group without lr"])
def test_inner_state_the_next_step_cannot_use_is_refused_at_load(inner, corruption):
    """Whatever the inner optimizer calls its state, a loaded tensor of the wrong shape would
    fail in the middle of its next step: half a step, with no LLaCA update. The load refuses
    it, naming the parameter, and changes nothing; the optimizer then steps as before."""
    model, optimizer = _wrapped(inner)
    twin_model, twin = copy.deepcopy((model, optimizer))
    saved = copy.deepcopy(optimizer.state_dict())
    key = _parameter_shaped_key(saved, 2)
    if corruption == "wrong shape":
        saved["inner"]["state"][2][key] = torch.zeros(7)
        pattern = rf"{key}.* of shape \(7,\) for parameter \(param_groups\[0\]\['params'\]\[2\]\)"
    elif corruption == "swapped between parameters":
        states = saved["inner"]["state"]
        states[0][key], states[2][key] = states[2][key], states[0][key]
        pattern = rf"{key}.* of shape \(5, 3\) for parameter \(param_groups\[0\]\['params'\]\[0\]\)"
    elif corruption == "a moment dropped":
        if inner == "SGD(momentum)":
            pytest.skip("SGD starts a missing momentum buffer afresh, as after a reset")
        del saved["inner"]["state"][2][key]
        pattern = rf"step from it fails at parameter \(param_groups\[0\]\['params'\]\[2\]\) \(saved id 2\) with KeyError: '{key}'"
    else:
        del saved["inner"]["param_groups"][0]["lr"]
        pattern = r"step from it fails at parameter \(param_groups\[0\]\['params'\]\[0\]\) \(saved id 0\) with KeyError: 'lr'"
    before = everything(model, optimizer)
    with pytest.raises(ValueError, match=pattern + ".*[Nn]othing was loaded"):
        optimizer.load_state_dict(saved)
    assert_same(before, everything(model, optimizer))
    grads = train(model, optimizer, 2)
    train(twin_model, twin, 2, grads)
    assert_same(everything(twin_model, twin), everything(model, optimizer))


@pytest.mark.parametrize("inner", list(INNER))
def test_a_good_inner_state_dict_loads_as_saved(inner):
    """The check steps stand-ins, never the state dict being loaded: every loaded tensor (step
    counts included) is the saved one, and training continues as it would have."""
    model, optimizer = _wrapped(inner)
    saved = copy.deepcopy(optimizer.state_dict())
    twin_model, twin = copy.deepcopy((model, optimizer))
    twin.load_state_dict(saved)
    assert_same(everything(model, optimizer), everything(twin_model, twin))
    grads = train(model, optimizer, 2)
    train(twin_model, twin, 2, grads)
    assert_same(everything(model, optimizer), everything(twin_model, twin))


def test_inner_optimizer_that_cannot_step_on_meta_still_needs_its_group_options():
    """transformers' Adafactor reads values on the host, so it cannot be tried on meta tensors:
    its loaded groups must still hold every option its groups hold."""
    transformers = pytest.importorskip("transformers")
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = LLaCA(transformers.optimization.Adafactor(model.parameters(), lr=1e-2, relative_step=False))
    train(model, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    optimizer.load_state_dict(copy.deepcopy(saved))  # a good one loads
    del saved["inner"]["param_groups"][0]["lr"]
    before = everything(model, optimizer)
    with pytest.raises(ValueError, match=r"param_groups\[0\] of the state dict \(inner optimizer\) has no 'lr'"):
        optimizer.load_state_dict(saved)
    assert_same(before, everything(model, optimizer))


@pytest.mark.parametrize("missing", ["lr", "betas", "eps", "weight_decay"])
def test_a_group_without_its_adamw_options_is_refused_at_load(missing):
    model = make_model()
    optimizer = LLaCAAdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    del saved["param_groups"][0][missing]
    before = everything(model, optimizer)
    with pytest.raises(ValueError, match=rf"param_groups\[0\] of the state dict \(LLaCAAdamW\) has no '{missing}'.*nothing was loaded"):
        optimizer.load_state_dict(saved)
    assert_same(before, everything(model, optimizer))
    train(model, optimizer, 1)


# The entries a step would refuse (tests/optim/test_errors.py edits them into the state; here they
# arrive through a state dict), with what the error says.
BAD_ENTRIES = {
    "step of two elements": (lambda e: e.__setitem__("step", torch.tensor([3.0, 3.0])), r"\['step'\].*got 2 elements of torch.float32"),
    "alpha of two elements": (lambda e: e.__setitem__("alpha", torch.zeros(2)), r"\['alpha'\].*got 2 elements"),
    "exp_avg_sq dropped": (lambda e: e.pop("exp_avg_sq"), r"has \['step', 'exp_avg'\] but not \['exp_avg_sq'\]"),
    "prev_grad dropped": (lambda e: e.pop("prev_grad"), r"but not \['prev_grad'\]"),
    "exp_avg as a list": (lambda e: e.__setitem__("exp_avg", [0.0]), r"\['exp_avg'\].*got a list"),
    "entry not a dict": (lambda e: None, r"\[1\] of the state dict \(LLaCAAdamW\).* is a int, not a dict"),
}


@pytest.mark.parametrize("case", list(BAD_ENTRIES))
def test_state_entries_the_next_step_would_refuse_are_refused_at_load(case):
    model = make_model()
    optimizer = LLaCAAdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    change, pattern = BAD_ENTRIES[case]
    if case == "entry not a dict":
        saved["state"][1] = 5
    else:
        change(saved["state"][1])
    before = everything(model, optimizer)
    with pytest.raises((RuntimeError, TypeError, ValueError), match=pattern + ".*nothing was loaded"):
        optimizer.load_state_dict(saved)
    assert_same(before, everything(model, optimizer))


def test_step_counts_saved_as_numbers_load_as_tensors():
    """torch's optimizers once saved ``step`` as a number, and their loaders still take it."""
    model = make_model()
    optimizer = LLaCAAdamW(model.parameters(), lr=1e-2)
    train(model, optimizer, 2)
    saved = copy.deepcopy(optimizer.state_dict())
    for entry in saved["state"].values():
        entry["step"] = float(entry["step"])
    twin_model = copy.deepcopy(model)
    twin = LLaCAAdamW(twin_model.parameters(), lr=1e-2)
    twin.load_state_dict(saved)
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    grads = train(model, optimizer, 2)
    train(twin_model, twin, 2, grads)
    assert_same(everything(model, optimizer), everything(twin_model, twin))


# ---------------------------------------------------------------- the wrapper's shared groups

def test_a_group_added_through_the_inner_optimizer_takes_the_wrappers_knobs():
    """The wrapper shares its inner optimizer's groups: one added there after wrapping steps
    as one added through the wrapper does, with the wrapper's LLaCA knobs."""
    results = []
    for through in ("inner", "wrapper"):
        torch.manual_seed(0)
        first, second = nn.Linear(4, 3), nn.Linear(3, 2)
        optimizer = LLaCA(torch.optim.SGD(first.parameters(), lr=0.05), preset="continual-next")
        (optimizer.optimizer if through == "inner" else optimizer).add_param_group(
            {"params": list(second.parameters()), "lr": 0.1})
        model = nn.Sequential(first, second)
        train(model, optimizer, 3)
        assert optimizer.param_groups[1]["preset"] == "continual-next"
        assert all(optimizer.ema(p) is not None for p in second.parameters())
        results.append(everything(model, optimizer))
    assert_same(*results)


def test_the_wrapper_follows_groups_its_inner_optimizer_replaced():
    """``wrapper.optimizer.load_state_dict`` replaces the inner optimizer's group list; the
    wrapper reads that list, so a learning rate loaded there is the one its step uses, and a
    scheduler on the wrapper reaches the inner optimizer."""
    model = nn.Sequential(nn.Linear(4, 3))
    optimizer = LLaCA(torch.optim.SGD(model.parameters(), lr=0.05))
    train(model, optimizer, 1)
    inner_saved = copy.deepcopy(optimizer.optimizer.state_dict())
    inner_saved["param_groups"][0]["lr"] = 0.2
    optimizer.optimizer.load_state_dict(inner_saved)
    assert optimizer.param_groups is optimizer.optimizer.param_groups
    assert optimizer.param_groups[0]["lr"] == 0.2
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    train(model, optimizer, 1)
    scheduler.step()
    assert optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
