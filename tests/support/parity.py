"""The parity rule every fused backend is held to against the reference (docs/spec.md section 3):
trajectories over 20+ steps of fresh random data, and the tolerance rule that compares them.

Tolerance rule (taken from flash-attention's tests): the kernel computes in fp32 like the fp32
reference does, so its error against the float64 oracle must stay within twice the error of the
plain-PyTorch fp32 reference against that oracle, plus a floor (for when the fp32 reference
happens to be exact) that scales with the dtype instead of being a hard-coded number: over 20
steps fp32 rounding differences compound to a few ulps of O(1) weights, and in 16-bit storage one
rounding that falls the other way moves a value by a whole 16-bit ulp. See assert_within_rule.

Alphas get a relative floor instead. fp32 parameters: 1e-4, since docs/spec.md allows fp32 accumulation
and the kernels sum each 32768-element chunk in fp32 SIMD lanes of a few thousand terms each (a
worst-case relative error of about 4096 * 2^-24 = 2.4e-4 per sum, typically ~1e-6) while the
reference sums in float64. 16-bit parameters: 1e-2, because the drift |p - ema| that the
alpha's denominator sums is O(lr) = 3e-3 here, below one bf16 ulp of O(1) weights (7.8e-3): each
weight that rounds the other way in one trajectory changes its term by an order-one fraction, and
a few dozen such flips among a few thousand elements move the sum by ~1e-2 relative.

Alphas are compared at every step, not only the last (see ``check_alphas``). The rule that replaces
an alpha outside (0, 1) by base_weight is a jump: where the exact alpha lies within that relative
floor of 1, the kernel and the references may fairly land on different sides of it, and from that
step on the tensor's EMA follows another path (seed 3509441899, bf16: the first AdamW step of
elements equal to 0.46875 lands exactly on a bf16 tie, which fp32 and fp64 round apart; the
flipped weights move one tensor's alpha by 0.2%, and at step 13 the references' alpha is 0.9993
while the kernel's is past 1). Such a tensor's EMA, alpha and fallback flag are compared up to
that step and not after; a split anywhere else, away from 1, fails the test.
"""

from __future__ import annotations

import math

import torch

from llaca_optim.ops.registry import reference_backend
from support.backends import kernel_device
from support.compare import describe_difference, max_abs_error
from support.cuda_sim import cuda_backend_for_tests
from support.trajectory import gradient_sequence, run_trajectory, tensor_zoo

STEPS = 21
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
REF32 = reference_backend(torch.float32)
REF64 = reference_backend(torch.float64)
ALPHAS_PER_STEP = "alphas per step"  # trajectories(): [step][tensor] -> (alpha, fell back) or None


def mean_abs(t: torch.Tensor) -> float:
    return float(t.detach().double().abs().nan_to_num(0.0, 0.0, 0.0).mean()) if t.numel() else 0.0


def mean_abs_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0:
        return 0.0
    a, e = actual.detach().double(), expected.detach().double()
    agree = (a == e) | (a.isnan() & e.isnan())
    return float((a - e).abs().nan_to_num(nan=float("inf")).masked_fill(agree, 0.0).mean())


# What a split (below) sends elsewhere.
ALPHA_KEYS = ("ema", "alpha", "alpha_fell_back", "signal_log_mean", "signal_count")


def alpha_relative_floor(dtype) -> float:
    return 1e-4 if dtype == torch.float32 else 1e-2


def check_alphas(kernel, ref32, ref64, dtype, horizon=False) -> set[int]:
    """Each step's alpha and fallback flag against the references'; returns the tensors whose
    fallback decision parted from both references' where the adaptive side's alpha lay within
    the alpha floor of 1 (see the module docstring): their later steps are not compared.

    ``horizon``: alphas from ``horizon=H``, which fall back only where the signal is not finite,
    that is where the drift |p - ema| is zero. With 16-bit parameters that is a rounding
    decision: an AdamW step of about half a 16-bit ulp leaves p where the EMA is in one run and
    moves it in another (the module docstring's ties). A split there is allowed for 16-bit
    parameters, as the split at alpha ~ 1 is; in fp32 it fails."""
    floor = alpha_relative_floor(dtype)
    split: set[int] = set()
    for step, (k_row, r32_row, r64_row) in enumerate(zip(kernel[ALPHAS_PER_STEP], ref32[ALPHAS_PER_STEP],
                                                        ref64[ALPHAS_PER_STEP])):
        for i, (k, r32, r64) in enumerate(zip(k_row, r32_row, r64_row)):
            if i in split or r64 is None:
                continue
            assert k is not None, f"step {step} tensor {i}: no alpha from the kernel"
            (a_k, fb_k), (a_32, fb_32), (a_64, fb_64) = k, r32, r64
            if fb_k != fb_64 and horizon and (dtype != torch.float32 or fb_k != fb_32):
                # Against the oracle's decision (also where the fp32 reference's is the kernel's:
                # the signal statistic then counts another step than the oracle's).
                assert dtype != torch.float32, (
                    f"step {step} tensor {i}: the kernel {'fell back' if fb_k else 'did not fall back'} "
                    f"(alpha {a_k}) but the references did not (alphas {a_32}, {a_64})")
                split.add(i)
                continue
            if fb_k != fb_64 and fb_k != fb_32:
                adaptive = a_64 if fb_k else a_k
                assert adaptive >= 1.0 - floor, (
                    f"step {step} tensor {i}: the kernel {'fell back' if fb_k else 'did not fall back'} "
                    f"(alpha {a_k}) but the references did not (alphas {a_32}, {a_64}), away from 1")
                split.add(i)
                continue
            if fb_k != fb_64:  # as the fp32 reference decided: compare with its alpha
                a_64 = a_32
            bound = 2.0 * abs(a_32 - a_64) + floor * abs(a_64)
            assert abs(a_k - a_64) <= bound, f"step {step} tensor {i}: alpha {a_k} vs {a_64} (fp32 {a_32})"
    return split


def assert_within_rule(kernel, ref32, ref64, dtype, steps=STEPS, horizon=False):
    """For every tensor: max error <= 2 x the fp32 reference's + sqrt(steps) roundings of the
    largest value in the *parameter's* dtype (independent rounding differences compound like a
    random walk; a 16-bit parameter that rounds the other way once moves its fp32 EMA by alpha x
    one bf16 ulp); and mean error <= 2 x the fp32 reference's + sqrt(steps) roundings of the mean
    value in the state's own dtype, which a systematic error cannot meet."""
    ulps = math.sqrt(steps)
    assert kernel.keys() == ref64.keys(), f"state keys differ: {sorted(kernel)} vs {sorted(ref64)}"
    split = check_alphas(kernel, ref32, ref64, dtype, horizon) if ALPHAS_PER_STEP in ref64 else set()
    for key in ref64:
        if key == ALPHAS_PER_STEP:
            continue
        for index, (k, r32, r64) in enumerate(zip(kernel[key], ref32[key], ref64[key])):
            if key in ALPHA_KEYS and index in split:
                continue
            what = f"{key}[{index}] (shape {tuple(r64.shape)})"
            assert k.dtype == r64.dtype and k.shape == r64.shape, f"{what}: dtype/shape differ"
            if key in ("step", "signal_count"):  # counts
                assert torch.equal(k, r64), f"{what}: {k} != {r64}"
                continue
            if key == "alpha_fell_back":
                # Exact, as the fp64 oracle's flag or as plain fp32 PyTorch's: with 16-bit
                # parameters the drift |p - ema| lies below one 16-bit ulp, so fp32 and fp64
                # arithmetic can round p apart and put a candidate alpha on either side of 1
                # (seed 3500128448: 0.85 in fp64, past 1 in fp32, for the reference backend
                # itself). The flash-attention rule again: no worse than fp32 PyTorch.
                assert torch.equal(k, r64) or torch.equal(k, r32), \
                    f"{what}: {k} != {r64} (fp32 reference: {r32})"
                continue
            if key == "alpha":
                max_floor = mean_floor = alpha_relative_floor(dtype) * float(r64.abs())
            elif key == "signal_log_mean":
                # The mean of log r: a relative error of the kernels' sums, as the alpha's, is
                # an absolute one here.
                max_floor = mean_floor = alpha_relative_floor(dtype)
            else:
                # Weights and gradients are O(1) here; a moment near zero is the difference of
                # O(1) terms, so its rounding error is that of O(1) values, not of itself.
                magnitude = float(r64.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) if r64.numel() else 0.0
                max_floor = ulps * torch.finfo(dtype).eps * max(magnitude, 1.0)
                mean_floor = ulps * torch.finfo(r64.dtype).eps * max(mean_abs(r64), 1.0)
                if key == "ema" and r64.dtype != dtype and r64.numel():
                    # An fp32 EMA of a 16-bit parameter inherits the parameter's rounding flips:
                    # each moves one element by alpha (< 1) x one 16-bit ulp. Allow sqrt(steps)
                    # of them spread over the tensor, as the max rule above allows one.
                    mean_floor += ulps * ulps * torch.finfo(dtype).eps * max(mean_abs(r64), 1.0) / r64.numel()
            error, bound = max_abs_error(k, r64), 2.0 * max_abs_error(r32, r64) + max_floor
            assert error <= bound, f"{what}: max error {error:.3e} > {bound:.3e}; {describe_difference(k, r64)}"
            error, bound = mean_abs_error(k, r64), 2.0 * mean_abs_error(r32, r64) + mean_floor
            assert error <= bound, f"{what}: mean error {error:.3e} > {bound:.3e}; {describe_difference(k, r64)}"


def trajectories(make, dtype, steps=STEPS, nonfinite_at=None, kernel="cpu"):
    """The kernel backend's trajectory and the fp32 and fp64 references', on the same data.
    ``kernel`` "triton" runs on the GPU when there is one, else through Triton's CPU interpreter
    (on a zoo without the largest tensor, which the interpreter would need seconds for); "cuda"
    runs the CUDA kernels on the GPU, else through their CPU emulation (tests/support/cuda_sim.py)."""
    if kernel == "triton":
        backend, device = "triton", kernel_device()
    elif kernel == "cuda":
        backend, device = cuda_backend_for_tests()
    else:
        backend, device = kernel, "cpu"
    # The tensor past the CPU kernel's whole-tensor limit matters to the cpu backend alone; on
    # CPU tensors the emulated CUDA kernels and Triton's interpreter run every chunk or block in
    # turn, so they leave it out, and Triton also the 18-block one (its 4097-element tensor
    # spans two 4096-element blocks already).
    emulated = device == "cpu" and kernel in ("triton", "cuda")
    makers = tensor_zoo(dtype, large=not emulated,
                        many_chunks=not (kernel == "triton" and device == "cpu"))
    grads = gradient_sequence(makers, steps, nonfinite_at)
    runs = []
    for b, d in ((backend, device), (REF32, "cpu"), (REF64, "cpu")):
        per_step: list[list[tuple[float, bool] | None]] = []

        def record(step, optimizer, params, per_step=per_step):
            rows = [optimizer.state.get(p, {}) for p in params]
            per_step.append([(float(r["alpha"]), bool(r["alpha_fell_back"])) if "alpha" in r else None
                             for r in rows])

        run = run_trajectory(lambda ps, b=b: make(ps, b), makers, grads, device=d, after_step=record)
        run[ALPHAS_PER_STEP] = per_step
        runs.append(run)
    return runs
