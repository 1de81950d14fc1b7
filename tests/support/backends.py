"""The backends under test, each named for what runs here.

On CPU tensors, on every machine: "reference" (ops/reference_kernels.py), "cpu" (the C++ kernels),
"cuda-emulated" (the CUDA backend's kernels and host code through their CPU emulation,
tests/cuda_sim/), "triton-interpreted" (the Triton kernels through Triton's interpreter,
TRITON_INTERPRET=1, which conftest.py sets where there is no GPU). The real GPU kernels run in
tests/backends/test_cuda_gpu.py and in the tests that put their tensors on ``kernel_device()``.

CI sets LLACA_REQUIRE_NATIVE=1: there a backend that cannot run is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest
import torch

import llaca_optim

REQUIRE_NATIVE = os.environ.get("LLACA_REQUIRE_NATIVE", "0") == "1"
BACKEND_KINDS = ("reference", "cpu", "cuda-emulated", "triton-interpreted")
# The fused kernels by backend name (tests that build their own runs pick the kernels by these),
# and those that run on a GPU (there the real ones; without one, cuda's emulation and Triton's
# interpreter where a test can use them).
FUSED_KERNELS = ("cpu", "triton", "cuda")
GPU_KERNELS = ("triton", "cuda")


def backend_or_skip(name: str) -> str:
    """``name`` if that backend can run here; else a skip, or a failure in CI (which builds the
    extension and installs triton, so both must run there)."""
    ok, why = llaca_optim.backend_status()[name]
    if not ok:
        if REQUIRE_NATIVE:
            pytest.fail(f"LLACA_REQUIRE_NATIVE=1 but the {name} backend is unavailable: {why}")
        pytest.skip(f"{name} backend unavailable: {why}")
    return name


def backends(*kinds: str) -> list:
    """Params of the ``backend`` fixture (``indirect=True``): every kind, or these."""
    return [pytest.param(kind, id=kind) for kind in kinds or BACKEND_KINDS]


def backend_value(kind: str):
    """What ``backend=`` of the optimizers takes for a kind; skips (or fails, in CI) where that
    kind cannot run here."""
    if kind == "cuda-emulated":
        from support.cuda_sim import emulated_cuda_backend

        backend_or_skip("cpu")  # built with the same toolchain as the CPU kernels
        return emulated_cuda_backend()
    if kind == "triton-interpreted":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("Triton's interpreter is off (a GPU machine runs the Triton kernels on the GPU)")
        return backend_or_skip("triton")
    if kind == "cpu":
        return backend_or_skip("cpu")
    return kind


def kernel_device() -> str:
    """Where the Triton tests put their tensors: the GPU when there is one, else the CPU
    (through TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"
