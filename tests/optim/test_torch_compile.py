"""``torch.compile`` of an optimizer step, as torch's docs teach it for torch's own optimizers
(``@torch.compile def step(): optimizer.step()``): the compiled step is the eager step, bit for
bit, in the parameters and every state tensor, deferred blends included, and without the
per-step copies a traced op costs (NOTE [torch.compile] in llaca_optim/optim/base.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support.compare import describe_difference
from support.trajectory import collect, gradient_sequence, tensor_zoo
from llaca_optim import LLaCA, LLaCAAdamW

# torch's own compile machinery warns about its use of torch.jit; nothing of ours.
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")

STEPS = 6
WITHOUT_GRAD = {2: {1, 4}, 3: {4}}  # step -> parameters without a gradient at that step


def _optimizer(params, kind: str, backend: str):
    if kind == "LLaCA(SGD)":
        return LLaCA(torch.optim.SGD(params, lr=0.05, momentum=0.9), backend=backend)
    return LLaCAAdamW(params, lr=3e-3, weight_decay=0.05, backend=backend)


def _train(kind: str, backend: str, makers, grads, compiled: bool):
    params = [nn.Parameter(make()) for make in makers]
    optimizer = _optimizer(params, kind, backend)
    step = torch.compile(optimizer.step) if compiled else optimizer.step
    for i, step_grads in enumerate(grads):
        for j, (p, g) in enumerate(zip(params, step_grads)):
            p.grad = None if j in WITHOUT_GRAD.get(i, ()) else g.clone()
        step()
    return collect(optimizer, params), optimizer, params, step


@pytest.mark.parametrize("kind,dtype", [("LLaCAAdamW", torch.float32),
                                        ("LLaCAAdamW", torch.bfloat16),
                                        ("LLaCA(SGD)", torch.float32)], ids=str)
def test_compiled_step_is_the_eager_step(cpu_backend, kind, dtype):
    makers = tensor_zoo(dtype)
    grads = gradient_sequence(makers, STEPS)
    torch._dynamo.reset()
    eager, *_ = _train(kind, cpu_backend, makers, grads, compiled=False)
    compiled, optimizer, params, step = _train(kind, cpu_backend, makers, grads, compiled=True)
    assert eager.keys() == compiled.keys()
    for key in eager:
        for i, (a, b) in enumerate(zip(eager[key], compiled[key])):
            if kind == "LLaCAAdamW":  # our op alone: opaque to the compiler, the same bits
                assert torch.equal(a, b), f"{key}[{i}]: {describe_difference(b, a)}"
            else:
                # The inner SGD step is torch's, which inductor compiles into kernels that
                # round differently from eager ones (fp32 ulps); the LLaCA update then sees
                # parameters a few ulps apart, and its sums and EMA follow by as little.
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"{key}[{i}]: {m}")
    # The tensor past the CPU kernel's whole-tensor limit really deferred its blend, and the
    # task API found it pending after the compiled steps.
    if kind == "LLaCAAdamW":
        assert any("ema_pending" in optimizer.state[p] for p in params)
    with optimizer.ema_weights():
        for p, e in zip(params, compiled["ema"]):
            assert torch.equal(p.detach(), e.to(p.dtype)) or p.numel() == 0
    if kind == "LLaCAAdamW":
        # The compiled step is the eager one in cost too: no functionalized copy of the
        # parameters (which a traced op made: a model's worth of allocation per step).
        from torch.profiler import ProfilerActivity, profile

        def allocated(run) -> int:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                run()
            return sum(max(0, e.self_cpu_memory_usage) for e in prof.events())

        # The eager step allocates the reference path's temporaries (the strided tensor).
        eager_bytes, compiled_bytes = allocated(optimizer.step), allocated(step)
        model_bytes = sum(p.numel() * p.element_size() for p in params)
        assert compiled_bytes < eager_bytes + model_bytes / 20, (compiled_bytes, eager_bytes)


def test_fullgraph_refuses_the_step_saying_why(cpu_backend):
    p = nn.Parameter(torch.randn(10))
    p.grad = torch.randn(10)
    optimizer = LLaCAAdamW([p], backend=cpu_backend)
    before = p.detach().clone()
    torch._dynamo.reset()
    with pytest.raises(Exception, match="call optimizer.step\\(\\) outside the compiled function"):
        torch.compile(optimizer.step, fullgraph=True)()
    assert torch.equal(p, before) and not optimizer.state
