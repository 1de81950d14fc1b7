"""What only a GPU can show about the GPU backends (skipped elsewhere): "auto" picks the CUDA
kernels, a step captured in a CUDA graph replays like eager steps (CUDA and Triton), and
torch.amp.GradScaler's overflowing steps change nothing. Parity with the reference, determinism and the in-kernel AMP handling run on the
GPU too, in tests/backends/test_cuda_backend.py (on CUDA tensors when a GPU is present).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support.trajectory import collect
from support.backends import backend_or_skip, GPU_KERNELS
from support.scenarios import check_grad_scaler_overflow
from llaca_optim import LLaCA, LLaCAAdamW

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.gpu]


@pytest.fixture
def cuda_backend() -> str:
    return backend_or_skip("cuda")


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(512, 1031), nn.GELU(), nn.Linear(1031, 64)).cuda()


def test_auto_picks_the_cuda_kernels(cuda_backend):
    optimizer = LLaCAAdamW(_model(0).parameters(), backend="auto")
    assert optimizer.backend == "cuda"


@pytest.mark.parametrize("backend", GPU_KERNELS)
@pytest.mark.parametrize("kind", ["fused", "fused, EMA read between replays", "wrapper",
                                  "fused, horizon"])
def test_captured_step_replays_like_eager_steps(backend, kind):
    """The eager twin of the fused optimizer blends within the step (defer_blend=False); reading
    an EMA between replays flushes the deferred blends, which the next replay must see (the
    flags live on the device). The gradients are allocated inside the capture (set_to_none), so
    the step's address tables are built and uploaded during the capture: the CUDA backend
    copies them outside the graph (NOTE [CUDA workspace]); Triton's upload from pinned memory
    is captured as a copy node whose host block torch never recycles. With a horizon the
    step's finish (the alpha op over the bucket's slot vectors, NOTE [horizon]) is captured too."""
    backend = backend_or_skip(backend)

    def make(model, defer):
        if kind.startswith("fused"):
            return LLaCAAdamW(model.parameters(), lr=1e-3, backend=backend, defer_blend=defer,
                              horizon=50 if kind.endswith("horizon") else None)
        return LLaCA(torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9), backend=backend)

    inputs = torch.randn(12, 16, 512, device="cuda")
    eager_model, graph_model = _model(1), _model(1)
    eager, graphed = make(eager_model, defer=False), make(graph_model, defer=True)

    def step(model, optimizer, x):
        optimizer.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        optimizer.step()

    static_x = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graphs asks
        for x in inputs[:3]:
            static_x.copy_(x)
            step(graph_model, graphed, static_x)
    torch.cuda.current_stream().wait_stream(side)
    for x in inputs[:3]:
        step(eager_model, eager, x)

    graph = torch.cuda.CUDAGraph()
    graphed.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        graph_model(static_x).pow(2).mean().backward()
        graphed.step()
    for i, x in enumerate(inputs[3:]):
        static_x.copy_(x)
        graph.replay()
        step(eager_model, eager, x)
        if kind == "fused, EMA read between replays" and i % 3 == 1:
            first = next(graph_model.parameters())
            torch.testing.assert_close(graphed.ema(first), eager.ema(next(eager_model.parameters())))
    torch.cuda.synchronize()
    a = collect(graphed, list(graph_model.parameters()))
    b = collect(eager, list(eager_model.parameters()))
    for key in b:
        for i, (x, y) in enumerate(zip(a[key], b[key])):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{key}[{i}]: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_grad_scaler_overflow_changes_nothing_on_cuda(cuda_backend, dtype):
    model = _model(2).to(dtype)
    check_grad_scaler_overflow(model, LLaCAAdamW(model.parameters(), lr=1e-3, backend="cuda"),
                               dtype, device="cuda")
