"""The CUDA backend on a machine without a GPU: its kernels and host code built for the CPU
emulation in tests/cuda_sim/ (see cuda_sim.h for what that can and cannot show) and reached as a
backend object, ``emulated_cuda_backend()``, that LLaCAAdamW and LLaCA accept like a name.

On a GPU machine the tests use the real backend ("cuda") instead; see ``cuda_backend_for_tests``.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from llaca_optim import _build as _build_flags
from llaca_optim.ops import library
from llaca_optim.ops.registry import Backend, native_backend

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "llaca_optim_sim"


@functools.lru_cache(maxsize=None)
def _build() -> None:
    from torch.utils import cpp_extension

    library.define(NAMESPACE)  # the schemas first (the real ops'), then the kernels for them
    sanitize = _build_flags.sanitizer_flags()  # tests/toolchain/test_sanitizers.py
    cpp_extension.load(
        name="llaca_optim_cuda_sim" + ("_sanitized" if sanitize else ""),
        sources=[str(ROOT / "tests" / "cuda_sim" / "ops_sim.cpp")],
        extra_include_paths=[str(ROOT / "csrc" / "include"), str(ROOT / "csrc" / "cuda"),
                             str(ROOT / "tests" / "cuda_sim")],
        # -ffp-contract=off: as the GPU build's --fmad=false (and the CPU kernels' flag).
        extra_cflags=["-O2", "-ffp-contract=off", *sanitize],
        extra_ldflags=_build_flags.sanitizer_flags(link=True),
        is_python_module=False,
    )


@functools.lru_cache(maxsize=None)
def emulated_cuda_backend() -> Backend:
    _build()
    # The emulation's chunks are 16 threads x 16 elements (kThreads under LLACA_CUDA_SIM).
    return native_backend("cuda", "cpu", ops=getattr(torch.ops, NAMESPACE), one_visit_limit=256)


def cuda_backend_for_tests():
    """(backend, device) of the CUDA backend's tests: the real kernels on a GPU where they were
    built, else the emulation on CPU tensors (tests/backends/test_cuda_gpu.py fails or skips, by
    LLACA_REQUIRE_NATIVE, where a GPU has no built kernels)."""
    import llaca_optim

    if torch.cuda.is_available() and llaca_optim.backend_status()["cuda"][0]:
        return "cuda", "cuda"
    return emulated_cuda_backend(), "cpu"
