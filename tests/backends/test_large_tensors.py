"""A tensor past 2^31 elements (64-bit indexing) on the GPU backends: an offset or a
block index kept in 32 bits would wrap there, and write the tail's updates over the head or
outside the tensor. Checked on the GPU (skipped elsewhere) for CUDA and Triton; the same check
runs here on a CPU tensor of 2^20 elements, so the check itself is known to pass on a correct
kernel and to catch a wrong one.

The whole tensor is too large for the float64 reference, so the check works in pieces: AdamW is
element-wise, so the head, the elements around 2^31 and the tail are compared with the reference
run on copies of those slices; the alpha is compared with the whole-tensor sums taken chunk by
chunk in float64; and the EMA blend of each slice with that alpha.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from support.backends import backend_or_skip, GPU_KERNELS
from llaca_optim import LLaCAAdamW, reference

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.gpu]

LR, WD, SCALE, BASE_WEIGHT = 1e-3, 0.01, 2.0, 0.01


def _l1_chunked(x_of, n: int, chunk: int = 2**27) -> float:
    """sum |x| over ``x_of(slice)`` for slices of ``chunk`` elements, in float64."""
    return sum(float(x_of(slice(i, min(i + chunk, n))).abs().sum(dtype=torch.float64))
               for i in range(0, n, chunk))


def check_large_tensor(backend: str, device: str, n: int, dtype=torch.bfloat16) -> None:
    mid = min(2**31, n // 2)
    pieces = [slice(0, 4096), slice(mid - 2048, mid + 2048), slice(n - 4099, n)]
    p = nn.Parameter(torch.randn(n, device=device, dtype=dtype))
    optimizer = LLaCAAdamW([p], lr=LR, weight_decay=WD, backend=backend)
    ref = [{"p": p.detach()[s].clone(), "m": torch.zeros(s.stop - s.start, device=device, dtype=dtype),
            "v": torch.zeros(s.stop - s.start, device=device, dtype=dtype),
            "step": torch.zeros((), device=device)} for s in pieces]
    prev_grad = ema_before = None
    for step in range(3):
        grad = torch.randn(n, device=device, dtype=dtype)
        p.grad = grad
        optimizer.step()
        optimizer.flush_ema()
        state = optimizer.state[p]
        for s, r in zip(pieces, ref):
            reference.adamw_step_(r["p"], grad[s], r["m"], r["v"], None, r["step"], lr=LR,
                                  beta1=0.9, beta2=0.999, weight_decay=WD, eps=1e-8,
                                  amsgrad=False, maximize=False)
            # A few 16-bit roundings either way at the slice's scale (a bf16 ulp is 2^-8 of
            # the magnitude): the kernel and the reference round the fp32 moments differently
            # now and then (tests/backends/test_parity.py's rule); a wrapped offset is off by O(1).
            for key, mine in (("p", p.detach()[s]), ("m", state["exp_avg"][s]),
                              ("v", state["exp_avg_sq"][s])):
                ulp = 2**-8 * float(r[key].abs().max())
                torch.testing.assert_close(mine, r[key], rtol=2**-7, atol=4 * ulp,
                                           msg=lambda m: f"step {step} {key}[{s}]: {m}")
        ema = state["ema"]
        if ema_before is None:
            assert torch.equal(ema, p.detach().to(ema.dtype))  # taken after the first step
        else:
            live = p.detach()
            a = _l1_chunked(lambda s: live[s].double() - ema_before[s].double(), n)
            b = _l1_chunked(lambda s: grad[s].double(), n)
            c = _l1_chunked(lambda s: grad[s].double() - prev_grad[s].double(), n)
            alpha, fell_back = reference.balance_weight(a, b, c, SCALE, BASE_WEIGHT)
            assert bool(state["alpha_fell_back"]) == fell_back
            assert float(state["alpha"]) == pytest.approx(alpha, rel=1e-4)
            used = float(state["alpha"])
            for s in pieces:
                expected = ema_before[s] + used * (live[s].float() - ema_before[s])
                torch.testing.assert_close(ema[s], expected, rtol=1e-6, atol=1e-7,
                                           msg=lambda m: f"step {step} ema[{s}]: {m}")
        ema_before = ema.clone()
        prev_grad = grad


def test_the_check_itself_on_a_cpu_tensor(cpu_backend):
    check_large_tensor(cpu_backend, "cpu", 2**20 + 4099)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", GPU_KERNELS)
def test_tensor_past_2_31_elements(backend):
    backend = backend_or_skip(backend)
    free, _ = torch.cuda.mem_get_info()
    if free < 48 * 2**30:  # bf16 p, g, m, v, prev_grad and a float32 EMA, twice the EMA, slack
        pytest.skip(f"needs 48 GiB of free GPU memory, has {free / 2**30:.0f}")
    try:
        check_large_tensor(backend, "cuda", 2**31 + 4099)
    finally:
        torch.cuda.empty_cache()
