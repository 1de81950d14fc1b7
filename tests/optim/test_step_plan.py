"""The per-group step plan that LLaCAAdamW and LLaCA reuse from step to step (llaca_optim/optim/base.py).

A reused plan must behave exactly like a fresh one: each case changes, between steps, something the
plan depends on (which parameters have gradients, a gradient's layout or dtype, the groups, the
task, the state) and checks the cpu backend against the reference backend stepped alongside it, or
that the bad step raises and changes nothing.
"""

from __future__ import annotations

import collections
import copy
import pickle

import pytest
import torch

from support.compare import assert_close, assert_equal
from llaca_optim import LLaCA, LLaCAAdamW
from llaca_optim.ops.roles import UNSAVED_STATE_KEYS

SHAPES = [(7, 5), (33,), (4, 4), (1,)]


def make_pair(kind, cpu_backend, params_a, params_b, **kw):
    if kind == "fused":
        return (LLaCAAdamW(params_a, lr=1e-2, backend=cpu_backend, **kw),
                LLaCAAdamW(params_b, lr=1e-2, backend="reference", **kw))
    return (LLaCA(torch.optim.SGD(params_a, lr=0.05, momentum=0.9), backend=cpu_backend, **kw),
            LLaCA(torch.optim.SGD(params_b, lr=0.05, momentum=0.9), backend="reference", **kw))


def twin_params(shapes=SHAPES):
    a = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    return a, b


def set_grads(a, b, grads):
    for pa, pb, g in zip(a, b, grads):
        pa.grad = None if g is None else g.clone()
        pb.grad = None if g is None else g.clone()


def step_both(opt_a, opt_b, a, b, grads):
    set_grads(a, b, grads)
    opt_a.step()
    opt_b.step()
    assert_same(opt_a, opt_b, a, b)


def assert_same(opt_a, opt_b, a, b):
    # fp32 kernel vs fp32 reference over a handful of steps: a few ulps of the values involved.
    # A blend the kernels left pending (a horizon's bucket defers) is applied first.
    opt_a.flush_ema()
    for i, (pa, pb) in enumerate(zip(a, b)):
        assert_close(pa, pb, rtol=1e-5, atol=1e-6, what=f"param {i}")
        sa, sb = ({k: v for k, v in opt.state.get(p, {}).items() if k not in UNSAVED_STATE_KEYS}
                  for opt, p in ((opt_a, pa), (opt_b, pb)))
        assert sorted(sa) == sorted(sb), f"param {i}: state keys {sorted(sa)} vs {sorted(sb)}"
        for key in sa:
            if isinstance(sa[key], torch.Tensor):
                assert_close(sa[key].float(), sb[key].float(), rtol=1e-4, atol=1e-6,
                             what=f"param {i} state {key}")


@pytest.mark.parametrize("shapes", [SHAPES, [(6,)] * 4], ids=["mixed", "alike"])
@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_gradients_coming_and_going(cpu_backend, kind, shapes):
    a, b = twin_params(shapes)
    opt_a, opt_b = make_pair(kind, cpu_backend, a, b)
    # Which parameters have a gradient changes from step to step, and back. With all shapes
    # alike, only the gradient mask tells a reused plan that it no longer fits.
    masks = [[1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 1, 1], [0, 1, 1, 0], [1, 1, 1, 1]]
    for mask in masks:
        step_both(opt_a, opt_b, a, b, [torch.randn(s) if m else None for s, m in zip(shapes, mask)])


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_gradient_layout_change_between_steps(cpu_backend, kind):
    a, b = twin_params()
    opt_a, opt_b = make_pair(kind, cpu_backend, a, b)
    for step in range(4):
        grads = [torch.randn(s) for s in SHAPES]
        if step == 2:  # same values, transposed memory layout: the plan must not be reused
            grads[0] = torch.randn(SHAPES[0][::-1]).t()
        step_both(opt_a, opt_b, a, b, grads)


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_bad_gradient_after_reused_steps_raises_and_changes_nothing(cpu_backend, kind):
    a, b = twin_params()
    opt_a, _ = make_pair(kind, cpu_backend, a, b)
    for _ in range(3):
        set_grads(a, b, [torch.randn(s) for s in SHAPES])
        opt_a.step()
    before_params = [p.detach().clone() for p in a]
    before_state = {i: {k: v.clone() for k, v in opt_a.state[p].items()} for i, p in enumerate(a)}
    a[2].grad.data = torch.randn(SHAPES[2], dtype=torch.float64)  # what a buggy hook can do
    with pytest.raises(RuntimeError, match=r"param_groups\[0\]\['params'\]\[2\].*dtype"):
        opt_a.step()
    for i, p in enumerate(a):
        assert_equal(p, before_params[i], what=f"param {i}")
        for k, v in before_state[i].items():
            assert_equal(opt_a.state[p][k], v, what=f"param {i} state {k}")


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_new_group_and_new_task_after_reused_steps(cpu_backend, kind):
    a, b = twin_params()
    opt_a, opt_b = make_pair(kind, cpu_backend, a[:2], b[:2])
    for step in range(6):
        if step == 2:
            opt_a.add_param_group({"params": a[2:]})
            opt_b.add_param_group({"params": b[2:]})
        if step == 4:
            opt_a.end_task()
            opt_b.end_task()
        step_both(opt_a, opt_b, a, b, [torch.randn(s) for s in SHAPES])


def test_group_option_change_between_steps(cpu_backend):
    a, b = twin_params()
    opt_a, opt_b = make_pair("fused", cpu_backend, a, b)
    for step in range(5):
        if step == 2:  # switching amsgrad on needs state the reused plan does not have
            opt_a.param_groups[0]["amsgrad"] = opt_b.param_groups[0]["amsgrad"] = True
        if step == 3:  # and LLaCA off: the plan must drop the EMA lists
            opt_a.param_groups[0]["llaca"] = opt_b.param_groups[0]["llaca"] = False
        step_both(opt_a, opt_b, a, b, [torch.randn(s) for s in SHAPES])


def test_state_dict_load_between_steps(cpu_backend):
    a, b = twin_params()
    opt_a, opt_b = make_pair("fused", cpu_backend, a, b)
    saved = None
    for step in range(5):
        if step == 2:
            saved = (opt_a.state_dict(), opt_b.state_dict())
        if step == 4:  # going back: the loaded state tensors are new objects
            opt_a.load_state_dict(saved[0])
            opt_b.load_state_dict(saved[1])
        step_both(opt_a, opt_b, a, b, [torch.randn(s) for s in SHAPES])


# --------------------------------------------------------------------- changes to optimizer.state
# torch's optimizers read `state` afresh at every step, and code written for them resets or edits
# it between steps; a reused plan must see each such change (llaca_optim/state.py). Each case is
# a few edits at given steps, applied to both optimizers alike (later ones to what earlier ones
# made), and the oracle is torch.optim.AdamW itself. An edit is (optimizer, params, nth edit).

def _edit_entry(key, change, index=0):
    return lambda opt, ps, nth: opt.state[ps[index]].__setitem__(key, change(opt.state[ps[index]][key]))


STATE_EDITS = {
    "reassign the map": lambda opt, ps, nth: setattr(opt, "state", collections.defaultdict(dict)),
    "clear the map": lambda opt, ps, nth: opt.state.clear(),
    "delete an entry": lambda opt, ps, nth: opt.state.__delitem__(ps[1]),
    "pop an entry": lambda opt, ps, nth: opt.state.pop(ps[2]),
    "assign a plain entry": lambda opt, ps, nth: opt.state.__setitem__(
        ps[0], {k: v * 0.5 if k == "exp_avg" else v.clone() for k, v in opt.state[ps[0]].items()}),
    "new exp_avg tensor": _edit_entry("exp_avg", lambda t: t + 0.1),
    "new step tensor": _edit_entry("step", lambda t: torch.tensor(1.0), index=3),
    "update an entry": lambda opt, ps, nth: opt.state[ps[1]].update(
        exp_avg_sq=opt.state[ps[1]]["exp_avg_sq"] * 4.0),
    "|= an entry": lambda opt, ps, nth: opt.state[ps[2]].__ior__(
        {"exp_avg": -opt.state[ps[2]]["exp_avg"]}),
    # A map and an entry of the user's, then edits inside what they became.
    "a new map, a plain entry, then edits in them": lambda opt, ps, nth: [
        STATE_EDITS["reassign the map"],
        lambda opt, ps, nth: opt.state.__setitem__(ps[0], {k: v * 2.0 for k, v in opt.state[ps[0]].items()}),
        _edit_entry("exp_avg_sq", lambda t: t * 3.0),
        STATE_EDITS["delete an entry"],
    ][nth](opt, ps, nth),
}
EDIT_STEPS = {"a new map, a plain entry, then edits in them": (1, 3, 4, 5)}


@pytest.mark.parametrize("edit", list(STATE_EDITS))
def test_state_edits_between_steps_are_seen_as_torch_adamw_sees_them(cpu_backend, edit):
    a, b = twin_params()
    ours = LLaCAAdamW(a, lr=1e-2, weight_decay=0.1, llaca=False, backend=cpu_backend)
    theirs = torch.optim.AdamW(b, lr=1e-2, weight_decay=0.1, foreach=False)
    edit_steps = EDIT_STEPS.get(edit, (2, 4))
    for step in range(7):
        if step in edit_steps:
            STATE_EDITS[edit](ours, a, edit_steps.index(step))
            STATE_EDITS[edit](theirs, b, edit_steps.index(step))
        set_grads(a, b, [torch.randn(s) for s in SHAPES])
        ours.step()
        theirs.step()
        for i, (pa, pb) in enumerate(zip(a, b)):
            assert_close(pa, pb, rtol=1e-5, atol=1e-6, what=f"step {step} param {i}")
            sa, sb = ours.state.get(pa, {}), theirs.state.get(pb, {})
            assert sorted(sa) == sorted(sb), f"step {step} param {i}: {sorted(sa)} vs {sorted(sb)}"
            for key in sb:
                assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6, what=f"step {step} param {i} {key}")


def test_param_replaced_in_its_group_list_between_steps(cpu_backend):
    a, b = twin_params()
    ours = LLaCAAdamW(a, lr=1e-2, llaca=False, backend=cpu_backend)
    theirs = torch.optim.AdamW(b, lr=1e-2, foreach=False)
    for step in range(5):
        if step == 2:  # the same list object, one element swapped for a new parameter alike
            new = torch.randn(SHAPES[1])
            a[1] = ours.param_groups[0]["params"][1] = torch.nn.Parameter(new.clone())
            b[1] = theirs.param_groups[0]["params"][1] = torch.nn.Parameter(new.clone())
        set_grads(a, b, [torch.randn(s) for s in SHAPES])
        ours.step()
        theirs.step()
        for i, (pa, pb) in enumerate(zip(a, b)):
            assert_close(pa, pb, rtol=1e-5, atol=1e-6, what=f"step {step} param {i}")


# With horizon=H the one-element slots of a bucket are views of one vector (ShardReduce in
# llaca_optim/optim/sharded.py): an entry put in, or written in place, must reach the step as well.
LLACA_EDITS = [({}, "ema"), ({}, "prev_grad"), ({}, "alpha"),
               ({"horizon": 5}, "alpha"), ({"horizon": 5}, "signal_log_mean"),
               ({"horizon": 5}, "signal_count")]


@pytest.mark.parametrize("in_place", [False, True], ids=["put-in", "in-place"])
@pytest.mark.parametrize("knobs,key", LLACA_EDITS, ids=[f"{k}{'-horizon' if kw else ''}" for kw, k in LLACA_EDITS])
@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_llaca_state_edits_between_steps(cpu_backend, kind, knobs, key, in_place):
    """LLaCA state tensors put in by the user, or edited in place: the oracle plans afresh at
    every step."""
    a, b = twin_params()
    opt_a, opt_b = make_pair(kind, cpu_backend, a, b, **knobs)
    for step in range(6):
        if step in (2, 4):
            for opt, ps in ((opt_a, a), (opt_b, b)):
                old = opt.state[ps[0]][key]
                new = torch.full_like(old, 0.25) if key == "alpha" else old * 0.5 + 1
                if in_place:
                    old.copy_(new)
                else:  # a one-element slot as a vector of one, which the checks admit
                    opt.state[ps[0]][key] = new.reshape(1) if old.dim() == 0 else new
        opt_b._invalidate_plans()
        step_both(opt_a, opt_b, a, b, [torch.randn(s) for s in SHAPES])


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_state_is_one_object_and_saves_as_plain_dicts(cpu_backend, kind, tmp_path):
    """The counting state map is the same object from construction on; state dicts and deep
    copies of it hold plain dicts (torch.load with weights_only=True admits no other)."""
    a, b = twin_params()
    opt, _ = make_pair(kind, cpu_backend, a, b)
    state = opt.state
    for _ in range(3):
        set_grads(a, b, [torch.randn(s) for s in SHAPES])
        opt.step()
    assert opt.state is state and isinstance(state, collections.defaultdict)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    loaded = torch.load(tmp_path / "opt.pt", weights_only=True)
    entries = (loaded if kind == "fused" else loaded["llaca"])["state"].values()
    assert len(entries) == len(SHAPES) and all(type(e) is dict for e in entries)
    for copied in (copy.copy(state), state.copy(), state | {}):  # shallow: the same entries
        assert type(copied) is collections.defaultdict and copied.default_factory is dict
        assert all(copied[p] is state[p] for p in state)
    for copied in (copy.deepcopy(state), pickle.loads(pickle.dumps(state))):
        assert type(copied) is collections.defaultdict and copied.default_factory is dict
        assert all(type(entry) is dict for entry in copied.values())


@pytest.mark.parametrize("knobs", [{}, {"horizon": 5}], ids=["scale", "horizon"])
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_copied_optimizer_steps_on_as_the_original(cpu_backend, kind, how, knobs):
    a, b = twin_params()
    opt, _ = make_pair(kind, cpu_backend, a, b, **knobs)
    for _ in range(3):
        set_grads(a, b, [torch.randn(s) for s in SHAPES])
        opt.step()
    twin = pickle.loads(pickle.dumps(opt)) if how == "pickle" else copy.deepcopy(opt)
    assert twin.backend == opt.backend
    twin_ps = [p for group in twin.param_groups for p in group["params"]]
    for _ in range(3):
        grads = [torch.randn(s) for s in SHAPES]
        for ps, o in ((a, opt), (twin_ps, twin)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            o.step()
        for i, (p, q) in enumerate(zip(a, twin_ps)):
            assert_equal(q, p, what=f"param {i} of the {how}d optimizer")
            for key, value in opt.state[p].items():
                assert_equal(twin.state[q][key], value, what=f"param {i} state {key}")
    if kind == "wrapper":  # the copy's groups are still its inner optimizer's
        assert twin.param_groups is twin.optimizer.param_groups


def test_optimizer_is_not_copied_while_its_ema_weights_are_swapped_in(cpu_backend):
    a, b = twin_params()
    opt, _ = make_pair("fused", cpu_backend, a, b)
    set_grads(a, b, [torch.randn(s) for s in SHAPES])
    opt.step()
    with opt.ema_weights():
        with pytest.raises(RuntimeError, match="cannot pickle or copy the optimizer while the EMA weights are swapped in"):
            copy.deepcopy(opt)
    copy.deepcopy(opt)  # and can be once they are back


@pytest.mark.parametrize("kind", ["fused", "wrapper"])
def test_a_horizon_buckets_slots_live_in_one_vector_per_kind(cpu_backend, kind):
    """The alpha op writes a horizon bucket's slots where the state keeps them: each kind's
    entries are views of one vector (a copy into and out of the op per tensor and step would cost
    host time in proportion to the number of tensors), also after the state is loaded anew."""
    a, b = twin_params()
    opt, _ = make_pair(kind, cpu_backend, a, b, horizon=5)
    for step in range(3):
        set_grads(a, b, [torch.randn(s) for s in SHAPES])
        opt.step()
        if step == 1:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for key in ("alpha", "alpha_fell_back", "signal_log_mean", "signal_count"):
            storages = {opt.state[p][key].untyped_storage().data_ptr() for p in a}
            assert len(storages) == 1, f"step {step}: {key} is held in {len(storages)} tensors"
