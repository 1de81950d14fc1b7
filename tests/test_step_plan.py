"""The per-group step plan that LLaCAAdamW and LLaCA reuse from step to step (llaca_optim/_core.py).

A reused plan must behave exactly like a fresh one: each case changes, between steps, something the
plan depends on (which parameters have gradients, a gradient's layout or dtype, the groups, the
task, the state) and checks the cpu backend against the reference backend stepped alongside it, or
that the bad step raises and changes nothing.
"""

from __future__ import annotations

import pytest
import torch

from _compare import assert_close, assert_equal
from llaca_optim import LLaCA, LLaCAAdamW

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
    for i, (pa, pb) in enumerate(zip(a, b)):
        assert_close(pa, pb, rtol=1e-5, atol=1e-6, what=f"param {i}")
        sa, sb = opt_a.state.get(pa, {}), opt_b.state.get(pb, {})
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
