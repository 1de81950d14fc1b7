"""The CUDA backend's kernels against the reference (docs/spec.md section 3), and the properties a step on a
GPU owes (docs/spec.md section 4): determinism, AMP, the workspace that a graph replay relies on. The
fused step's case set and non-finite gradients run in tests/backends/test_parity.py, beside Triton's.

Without a GPU (CI) the kernels and their host code run on CPU tensors through the emulation of
tests/support/cuda_sim.py, built from the same sources as the GPU build (csrc/cuda/); with one, on CUDA
tensors. tests/backends/test_cuda_gpu.py adds what only a GPU can show (graph capture, GradScaler on CUDA).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support.compare import assert_equal
from support.cuda_sim import cuda_backend_for_tests, emulated_cuda_backend
from support.trajectory import collect
from support.parity import DTYPES, assert_within_rule, trajectories
from llaca_optim import LLaCA, LLaCAAdamW
from llaca_optim.ops.registry import reference_backend

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ema_dtype", [None, "param"])
def test_ema_dtype_and_llaca_off(dtype, ema_dtype):
    def make(params, backend):
        return LLaCAAdamW(params, lr=1e-2, ema_dtype=ema_dtype, preset="continual-next",
                          backend=backend)

    kernel, ref32, ref64 = trajectories(make, dtype, kernel="cuda")
    expected = torch.float32 if (ema_dtype is None and dtype != torch.float32) else dtype
    assert all(e.dtype == expected for e in kernel["ema"])
    assert_within_rule(kernel, ref32, ref64, dtype)

    off, ref32, ref64 = trajectories(
        lambda ps, b: LLaCAAdamW(ps, lr=1e-2, llaca=False, backend=b), dtype, steps=6, kernel="cuda")
    assert "ema" not in off
    assert_within_rule(off, ref32, ref64, dtype, steps=6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_standalone_update_behind_the_wrapper(dtype):
    def make(params, backend):
        return LLaCA(torch.optim.SGD(params, lr=0.05, momentum=0.9), preset="coin", backend=backend)

    kernel, ref32, ref64 = trajectories(make, dtype, kernel="cuda")
    for k, r in zip(kernel["param"], ref64["param"]):
        assert_equal(k, r, what="param")  # the inner step is the same torch code
    assert_within_rule(kernel, ref32, ref64, dtype)


def _model_and_data(device, dtype=torch.float32):
    model = nn.Sequential(nn.Linear(300, 257), nn.GELU(), nn.Linear(257, 5)).to(device, dtype)
    data = torch.randn(6, 8, 300, device=device, dtype=dtype)
    return model, data


def _twins(device, seed):
    """A model, an identical twin, and the data both train on."""
    torch.manual_seed(seed)
    model, data = _model_and_data(device)
    twin, _ = _model_and_data(device)
    twin.load_state_dict(model.state_dict())
    return model, twin, data


def _train(model, optimizer, data, zero_grad_in_place=False):
    for x in data:
        optimizer.zero_grad(set_to_none=not zero_grad_in_place)
        model(x).float().pow(2).mean().backward()
        optimizer.step()


def test_same_inputs_give_the_same_bits():
    """Sums run in a fixed order whichever block finishes a tensor last (the emulation shuffles
    the block order of every launch, so the two runs finish tensors in different orders)."""
    backend, device = cuda_backend_for_tests()
    runs = []
    for _ in range(2):
        torch.manual_seed(1234)
        model, data = _model_and_data(device)
        optimizer = LLaCAAdamW(model.parameters(), lr=1e-2, backend=backend)
        _train(model, optimizer, data)
        runs.append(collect(optimizer, list(model.parameters())))
    for key in runs[0]:
        for i, (a, b) in enumerate(zip(runs[0][key], runs[1][key])):
            assert_equal(a, b, what=f"{key}[{i}]")


def test_steps_reusing_their_tables_match_the_reference():
    """Gradients zeroed in place keep their addresses, so every step after the first finds its
    tables in the workspace cache (the path a captured graph relies on): same results."""
    backend, device = cuda_backend_for_tests()
    model, twin, data = _twins(device, 99)
    ours = LLaCAAdamW(model.parameters(), lr=1e-2, backend=backend)
    reference = LLaCAAdamW(twin.parameters(), lr=1e-2, backend=reference_backend())
    _train(model, ours, data, zero_grad_in_place=True)
    _train(twin, reference, data, zero_grad_in_place=True)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.ema(p), reference.ema(q), rtol=1e-5, atol=1e-6)


def test_many_layouts_evict_and_rebuild_tables():
    """More distinct tensor layouts than the cache holds (16): entries are dropped and rebuilt,
    and every optimizer still steps correctly."""
    backend, device = cuda_backend_for_tests()
    pairs = []
    for n in range(20):
        p = nn.Parameter(torch.randn(300 + n, device=device))
        q = nn.Parameter(p.detach().clone())
        pairs.append((p, q, LLaCAAdamW([p], lr=1e-2, backend=backend),
                      LLaCAAdamW([q], lr=1e-2, backend=reference_backend())))
    for _ in range(3):
        for p, q, ours, reference in pairs:
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()
            ours.step()
            reference.step()
    for p, q, ours, reference in pairs:
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.ema(p), reference.ema(q), rtol=1e-5, atol=1e-6)


def test_found_inf_and_grad_scale_tensors():
    """AMP inside the kernels: a set found-inf flag changes nothing at all; a grad scale divides
    the gradients (a power of two, so exactly)."""
    backend, device = cuda_backend_for_tests()
    model, twin, data = _twins(device, 5)
    ours = LLaCAAdamW(model.parameters(), lr=1e-2, backend=backend)
    plain = LLaCAAdamW(twin.parameters(), lr=1e-2, backend=backend)
    scale = torch.tensor(512.0, device=device)
    for step, x in enumerate(data):
        for m, opt in ((model, ours), (twin, plain)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
        for p in model.parameters():
            p.grad.mul_(scale)
        overflow = step == 3
        ours.grad_scale = scale
        ours.found_inf = torch.tensor(1.0 if overflow else 0.0, device=device)
        before = collect(ours, list(model.parameters()))
        ours.step()
        if overflow:
            after = collect(ours, list(model.parameters()))
            for key in before:
                for a, b in zip(before[key], after[key]):
                    assert_equal(a, b, what=key)
        else:
            plain.step()
    ours_state, plain_state = collect(ours, list(model.parameters())), collect(plain, list(twin.parameters()))
    for key in ours_state:
        for a, b in zip(ours_state[key], plain_state[key]):
            assert_equal(a, b, what=key)


def test_learning_rate_on_the_device_equals_float():
    """The CUDA kernels read a learning-rate tensor on the GPU from device memory (a CPU one is
    read on the host, as for the other backends in tests/optim/test_adamw_compat.py)."""
    backend, device = cuda_backend_for_tests()
    model, twin, data = _twins(device, 11)
    as_float = LLaCAAdamW(model.parameters(), lr=3e-3, backend=backend)
    as_tensor = LLaCAAdamW(twin.parameters(), backend=backend,
                           lr=torch.tensor(3e-3, dtype=torch.float64, device=device))
    _train(model, as_float, data)
    _train(twin, as_tensor, data)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_equal(p, q, what="param")
        assert_equal(as_float.ema(p), as_tensor.ema(q), what="ema")


def test_opcheck_emulated_ops():
    """Schema, fake implementation and registration of the ops as the CUDA code implements them."""
    emulated_cuda_backend()
    shapes = [(5,), (4, 3), (0,), (700,)]
    params = [torch.randn(s) for s in shapes]
    like = lambda: [torch.rand(s) for s in shapes]  # noqa: E731
    pending = lambda: [torch.tensor(i % 2 == 1) for i in range(len(shapes))]  # noqa: E731
    args = (params, like(), like(), like(), like(), [torch.tensor(3.0) for _ in shapes],
            [p.clone() for p in params], like(), [torch.tensor(0.5) for _ in shapes],
            [torch.tensor(False) for _ in shapes], pending())
    kwargs = dict(lr=1e-3, beta1=0.9, beta2=0.999, weight_decay=0.01, eps=1e-8, amsgrad=True,
                  maximize=False, llaca=True, scale=2.0, base_weight=0.01)
    torch.library.opcheck(torch.ops.llaca_optim_sim.adamw_llaca_.default, args, kwargs)
    flush_args = (params, [p.clone() for p in params], [torch.tensor(0.5) for _ in shapes], pending())
    torch.library.opcheck(torch.ops.llaca_optim_sim.llaca_flush_.default, flush_args, {})


def test_bad_op_input_is_refused_before_anything_changes():
    emulated_cuda_backend()
    params = [torch.randn(10), torch.randn(10)]
    saved = [p.clone() for p in params]
    with pytest.raises(RuntimeError, match=r"grads\[1\] has shape"):
        torch.ops.llaca_optim_sim.llaca_update_(
            params, [torch.randn(10), torch.randn(9)], [p.clone() for p in params],
            [torch.randn(10) for _ in params], [torch.tensor(0.5) for _ in params],
            [torch.tensor(False) for _ in params], scale=2.0, base_weight=0.01)
    with pytest.raises(RuntimeError, match="found_inf must be a one-element float32 tensor"):
        torch.ops.llaca_optim_sim.llaca_update_(
            params, [torch.randn(10) for _ in params], [p.clone() for p in params],
            [torch.randn(10) for _ in params], [torch.tensor(0.5) for _ in params],
            [torch.tensor(False) for _ in params], scale=2.0, base_weight=0.01,
            found_inf=torch.tensor([0.0, 0.0]))
    for p, s in zip(params, saved):
        assert torch.equal(p, s)
