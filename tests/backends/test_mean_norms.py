"""The size-invariant balance weight (``norms="mean"``, docs/spec.md section 2): alpha formed from
the L1 means ``a/n, b/n, c/n`` instead of the sums. Checked three ways:

* the formula itself, on every backend, against alphas computed here by hand from the
  gradients (the same scenario under SGD, whose step is known exactly);
* its point: a tensor and the same tensor tiled many times (equal per-element statistics) get
  equal alphas, where the published sums give them different ones;
* parity with the reference over 21 steps and every state tensor, by the rule of
  tests/support/parity.py, on the cpu backend (every dtype, both ops) and the Triton and CUDA
  kernels (a smaller set: the mean norms change only the scalar that forms alpha).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llaca_optim import LLaCA, LLaCAAdamW
from support.backends import backends
from support.parity import DTYPES, assert_within_rule, trajectories

# With the means, this scale puts every populated tensor of the test zoo (1 to 266,243 elements)
# in the adaptive range at lr 3e-3; the published sums would need a different scale per size.
SCALE = 1e-4


def _sgd_alpha_by_hand(g1: torch.Tensor, g2: torch.Tensor, lr: float, scale: float) -> float:
    """Under plain SGD the EMA after step 1 is p1 (taken after the step), and at step 2
    ``p2 - ema = -lr * g2``: alpha from the L1 means of the drift, the gradient and its change,
    in float64."""
    n = g1.numel()
    g1, g2 = g1.double(), g2.double()
    a = (lr * g2).abs().sum() / n
    b = g2.abs().sum() / n
    c = (g2 - g1).abs().sum() / n
    return float(scale * (1 + b) / (a * c))


@pytest.mark.parametrize("backend", backends(), indirect=True)
def test_alpha_is_the_formula_on_l1_means(backend):
    lr, scale, n = 0.01, 1e-5, 3001
    p = nn.Parameter(torch.randn(n))
    optimizer = LLaCA(torch.optim.SGD([p], lr=lr), norms="mean", scale=scale, backend=backend)
    g1, g2 = torch.randn(n), torch.randn(n)
    for g in (g1, g2):
        p.grad = g.clone()
        optimizer.step()
    expected = _sgd_alpha_by_hand(g1, g2, lr, scale)
    assert 0 < expected < 1, "the scenario must take the adaptive branch"
    state = optimizer.state[p]
    assert not bool(state["alpha_fell_back"])
    # float32 parameters: p2 - p1 is -lr * g2 up to float32 rounding of the two steps.
    torch.testing.assert_close(float(state["alpha"]), expected, rtol=1e-4, atol=0)


@pytest.mark.parametrize("backend", backends("reference", "cpu"), indirect=True)
def test_a_tiled_tensor_gets_the_same_alpha_with_the_means(backend):
    tiles, steps = 64, 6
    small = nn.Parameter(torch.randn(300))
    large = nn.Parameter(small.detach().repeat(tiles))
    grads = [torch.randn(300) for _ in range(steps)]
    alphas = {}
    for norms, scale in (("mean", SCALE), ("sum", 1e-2)):
        params = [nn.Parameter(small.detach().clone()), nn.Parameter(large.detach().clone())]
        optimizer = LLaCAAdamW(params, lr=3e-3, norms=norms, scale=scale, backend=backend)
        for g in grads:
            params[0].grad, params[1].grad = g.clone(), g.repeat(tiles)
            optimizer.step()
        alphas[norms] = [float(optimizer.state[q]["alpha"]) for q in params]
        assert not any(bool(optimizer.state[q]["alpha_fell_back"]) for q in params), \
            "both tensors must take the adaptive branch"
    small_alpha, large_alpha = alphas["mean"]
    torch.testing.assert_close(large_alpha, small_alpha, rtol=1e-5, atol=0)
    # The published sums: a and c grow 64-fold and 1 + b about as much, so the tiled tensor's
    # alpha is about 64 times smaller.
    ratio = alphas["sum"][0] / alphas["sum"][1]
    assert tiles / 2 < ratio < tiles * 2, ratio


def _adaptive_taken(ref64) -> None:
    fell_back = torch.stack(ref64["alpha_fell_back"])
    populated = torch.tensor([p.numel() > 0 for p in ref64["param"]])
    assert not fell_back[populated].all(), "no tensor took the adaptive alpha"


def _maker(op: str):
    def make(params, backend):
        if op == "adamw":
            return LLaCAAdamW(params, lr=3e-3, weight_decay=0.05, norms="mean", scale=SCALE,
                              backend=backend)
        return LLaCA(torch.optim.SGD(params, lr=3e-3, momentum=0.9), norms="mean", scale=SCALE,
                     backend=backend)
    return make


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["adamw", "wrapper"])
def test_cpu_backend_matches_reference(cpu_backend, dtype, op):
    kernel, ref32, ref64 = trajectories(_maker(op), dtype)
    assert_within_rule(kernel, ref32, ref64, dtype)
    _adaptive_taken(ref64)


@pytest.mark.parametrize("kernel,dtype,op", [
    ("triton", torch.float32, "adamw"),
    ("cuda", torch.float32, "adamw"),
    ("cuda", torch.bfloat16, "wrapper"),
], ids=lambda v: str(v).removeprefix("torch."))
def test_gpu_backends_match_reference(kernel, dtype, op, request):
    if kernel == "triton":
        request.getfixturevalue("triton_backend")
    run, ref32, ref64 = trajectories(_maker(op), dtype, kernel=kernel)
    assert_within_rule(run, ref32, ref64, dtype)
    _adaptive_taken(ref64)
