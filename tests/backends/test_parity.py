"""The cpu backend (and the GPU backends' cases) against the reference (docs/spec.md section 3),
over 20+ steps of fresh random data, comparing parameters, moments, EMA, previous gradients, step
counts and alphas, by the rule of tests/support/parity.py."""

from __future__ import annotations

import pytest
import torch

from llaca_optim import LLaCA, LLaCAAdamW
from support.backends import FUSED_KERNELS, GPU_KERNELS, kernel_device
from support.cases import covering_product
from support.compare import assert_equal, describe_difference
from support.parity import DTYPES, STEPS, assert_within_rule, trajectories
from support.trajectory import gradient_sequence, run_trajectory, tensor_zoo


# The whole product runs in `.ci/run`; the README's command runs a subset holding every pair of
# factor values (support/cases.py).
@pytest.mark.parametrize("dtype,preset,weight_decay,amsgrad,maximize,regime", covering_product(
    DTYPES, ["coin", "continual-next"], [0.0, 0.05], [False, True], [False, True],
    ["adaptive", "fallback"]))
def test_fused_adamw_matches_reference(cpu_backend, dtype, preset, weight_decay, amsgrad, maximize, regime):
    # A huge scale pushes every alpha above 1, so every step takes the fallback branch.
    scale = None if regime == "adaptive" else 1e12

    def make(params, backend):
        return LLaCAAdamW(params, lr=3e-3, weight_decay=weight_decay, amsgrad=amsgrad,
                          maximize=maximize, preset=preset, scale=scale, backend=backend)

    kernel, ref32, ref64 = trajectories(make, dtype)
    assert_within_rule(kernel, ref32, ref64, dtype)
    fell_back = torch.stack(ref64["alpha_fell_back"])
    populated = torch.tensor([p.numel() > 0 for p in ref64["param"]])
    if regime == "fallback":
        assert fell_back.all()
    else:  # the test is only meaningful if the adaptive branch was really taken
        assert not fell_back[populated].all(), "no tensor took the adaptive alpha"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ema_dtype", [None, "param"])
def test_ema_dtype_options(cpu_backend, dtype, ema_dtype):
    def make(params, backend):
        return LLaCAAdamW(params, lr=1e-2, ema_dtype=ema_dtype, preset="continual-next", backend=backend)

    kernel, ref32, ref64 = trajectories(make, dtype)
    expected = torch.float32 if (ema_dtype is None and dtype != torch.float32) else dtype
    assert all(e.dtype == expected for e in kernel["ema"])
    assert_within_rule(kernel, ref32, ref64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel", FUSED_KERNELS)
def test_nonfinite_gradients_fall_back_without_crashing(kernel, dtype, request):
    if kernel != "cuda":  # cuda: the real kernels, or their emulation (always available)
        request.getfixturevalue(f"{kernel}_backend")

    def make(params, backend):
        return LLaCAAdamW(params, lr=1e-3, backend=backend)

    kernel_run, ref32, ref64 = trajectories(make, dtype, steps=4, nonfinite_at=2, kernel=kernel)  # noqa: F841
    for key in ("alpha", "alpha_fell_back"):
        for k, r in zip(kernel_run[key], ref64[key]):
            assert torch.equal(k, r), f"{key}: {k} != {r}"
    # every populated tensor had an inf/nan gradient at step 2, so its alpha fell back ever after
    populated = [p.numel() > 1 for p in ref64["param"]]
    assert all(bool(f) for f, pop in zip(kernel_run["alpha_fell_back"], populated) if pop)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inner", ["sgd", "adam", "adafactor"])
def test_wrapper_matches_reference(cpu_backend, dtype, inner):
    def make(params, backend):
        if inner == "sgd":
            base = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        elif inner == "adafactor":  # transformers' (factored second moments, in-place updates)
            optimization = pytest.importorskip("transformers.optimization")
            base = optimization.Adafactor(params, lr=3e-3, relative_step=False,
                                          scale_parameter=False, warmup_init=False)
        else:
            base = torch.optim.Adam(params, lr=3e-3, foreach=False)
        return LLaCA(base, preset="coin", backend=backend)

    kernel, ref32, ref64 = trajectories(make, dtype)
    # The inner step is the same torch code in all three runs: parameters agree exactly.
    for k, r in zip(kernel["param"], ref64["param"]):
        assert_equal(k, r, what="param")  # NaN == NaN: fp16 Adam can make its own NaNs
    assert_within_rule(kernel, ref32, ref64, dtype)


def test_llaca_does_not_change_the_adamw_trajectory(cpu_backend):
    makers = tensor_zoo(torch.float32)
    grads = gradient_sequence(makers, STEPS)
    on = run_trajectory(lambda ps: LLaCAAdamW(ps, backend="cpu"), makers, grads)
    off = run_trajectory(lambda ps: LLaCAAdamW(ps, llaca=False, backend="cpu"), makers, grads)
    for key in ("param", "exp_avg", "exp_avg_sq", "step"):
        for a, b in zip(on[key], off[key]):
            assert torch.equal(a, b), f"{key}: {describe_difference(a, b)}"
    assert "ema" not in off


# The Triton and CUDA kernels against the same rule. Under Triton's interpreter or the CUDA
# emulation every block runs on one CPU thread, so instead of the full product above, each case of
# docs/spec.md section 3 appears in a smaller set: every dtype with both presets and both alpha regimes,
# and weight decay, amsgrad and maximize switched on in turn across those twelve runs.
GPU_CASES = [
    (dtype, preset, regime, i % 2 == 0, i % 3 == 0, i % 4 == 1)
    for i, (dtype, preset, regime) in enumerate(
        (d, p, r) for d in DTYPES for p in ("coin", "continual-next") for r in ("adaptive", "fallback"))
]


@pytest.mark.parametrize("dtype,preset,regime,weight_decay_on,amsgrad,maximize", GPU_CASES,
                         ids=lambda v: str(v).removeprefix("torch."))
@pytest.mark.parametrize("kernel", GPU_KERNELS)
def test_gpu_backends_fused_adamw_matches_reference(kernel, dtype, preset, regime,
                                                    weight_decay_on, amsgrad, maximize, request):
    if kernel == "triton":
        request.getfixturevalue("triton_backend")
    scale = None if regime == "adaptive" else 1e12

    def make(params, backend):
        return LLaCAAdamW(params, lr=3e-3, weight_decay=0.05 if weight_decay_on else 0.0,
                          amsgrad=amsgrad, maximize=maximize, preset=preset, scale=scale,
                          backend=backend)

    run, ref32, ref64 = trajectories(make, dtype, kernel=kernel)
    assert_within_rule(run, ref32, ref64, dtype)
    fell_back = torch.stack(ref64["alpha_fell_back"])
    populated = torch.tensor([p.numel() > 0 for p in ref64["param"]])
    if regime == "fallback":
        assert fell_back.all()
    else:
        assert not fell_back[populated].all(), "no tensor took the adaptive alpha"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_wrapper_and_ema_dtype(triton_backend, dtype):
    """The standalone update (llaca_update_) behind the wrapper, with the EMA in the parameter's
    dtype: the other op and the other EMA storage."""
    def make(params, backend):
        return LLaCA(torch.optim.SGD(params, lr=0.05, momentum=0.9), preset="coin",
                     ema_dtype="param", backend=backend)

    kernel, ref32, ref64 = trajectories(make, dtype, kernel="triton")
    assert all(e.dtype == dtype for e in kernel["ema"])
    assert_within_rule(kernel, ref32, ref64, dtype)


def test_triton_with_another_block_size_and_warps(triton_backend):
    """A launcher given a block size and warp count of its own (what benchmarks/triton_tune.py
    times) holds to the same rule: the block size changes the order of the sums, no more."""
    from llaca_optim.ops import triton as _triton
    from llaca_optim.ops.registry import triton_backend as make_triton_backend

    # Under the interpreter a larger block than its default (fewer programs run in Python).
    block = 2 * _triton.BLOCK if _triton.interpreting() else 4096
    other = make_triton_backend(kernel_device(), block=block, num_warps=8)

    def make(params, backend):
        return LLaCAAdamW(params, lr=3e-3, weight_decay=0.05, amsgrad=True,
                          backend=other if backend == "triton" else backend)

    run, ref32, ref64 = trajectories(make, torch.bfloat16, kernel="triton")
    assert_within_rule(run, ref32, ref64, torch.bfloat16)
    with pytest.raises(ValueError, match="power of two of at least 16 elements, got block=1000"):
        make_triton_backend(kernel_device(), block=1000)


def test_triton_address_table_and_alignment(triton_backend):
    """The address table holds every column's addresses in order (zeros for an absent one),
    and 16-byte vector accesses are allowed only when every element array is 16-byte aligned:
    a view one element in (a dense tensor the kernels accept) turns them off; the per-tensor
    scalars after the element arrays do not count."""
    from llaca_optim.ops import triton as _triton
    from llaca_optim.ops import roles
    from llaca_optim.ops.triton import kernels

    base = torch.zeros(4 * 1024 + 1)
    aligned_views, odd_view = [base[:1024], base[1024:2048]], base[1:1025]
    scalars = list(torch.zeros(3)[1:])  # 4 and 8 bytes in: misaligned, and beside the point
    n_element = int(kernels.STEP)  # the element arrays' rows come first, then the scalar slots'
    n_rows = len(roles.TABLE_ROWS)
    for arrays, expect in ((aligned_views, True), ([aligned_views[0], odd_view], False)):
        columns = {"params": arrays, "state_steps": scalars}
        table, aligned = _triton.TritonLauncher.addresses(columns, 2, torch.device("cpu"))
        assert aligned is expect
        expected = [t.data_ptr() for t in arrays] + [0] * 2 * (n_element - 1) + \
            [s.data_ptr() for s in scalars] + [0] * 2 * (n_rows - n_element - 1)
        assert table.tolist() == expected


@pytest.mark.parametrize("kernel,dtype,kind", covering_product(
    list(FUSED_KERNELS), DTYPES, ["fused", "wrapper"]))
def test_horizon_matches_reference(kernel, dtype, kind, request):
    """``horizon=H`` (NOTE [horizon] in optim/sharded.py) on every backend: the kernels' sums,
    then the alpha op's calibrated rule, then the blend (deferred where the backend defers), for
    both optimizers; every state tensor, the signal statistic included, and every step's alphas
    against the references'."""
    if kernel == "triton":
        request.getfixturevalue("triton_backend")

    def make(params, backend):
        if kind == "fused":
            return LLaCAAdamW(params, lr=3e-3, weight_decay=0.05, horizon=7, backend=backend)
        return LLaCA(torch.optim.Adam(params, lr=3e-3, foreach=False), horizon=7, backend=backend)

    run, ref32, ref64 = trajectories(make, dtype, kernel=kernel)
    assert {"signal_log_mean", "signal_count"} <= run.keys()
    assert_within_rule(run, ref32, ref64, dtype, horizon=True)
    fell_back = torch.stack(ref64["alpha_fell_back"])
    populated = torch.tensor([p.numel() > 0 for p in ref64["param"]])
    # Only a signal that is not finite falls back (a 16-bit tensor whose drift is below one
    # ulp has a = 0); the calibrated branch must be taken.
    assert not fell_back[populated].all(), "no tensor took the calibrated alpha"
