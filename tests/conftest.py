"""Shared fixtures and helpers of the test suite.

CI sets LLACA_REQUIRE_NATIVE=1: there a missing CPU extension is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest
import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors. It must be
# switched on before triton compiles (decorates) any kernel, so before llaca_optim loads them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import llaca_optim  # noqa: E402

REQUIRE_NATIVE = os.environ.get("LLACA_REQUIRE_NATIVE", "0") == "1"


def cpu_backend_or_skip() -> str:
    ok, why = llaca_optim.backend_status()["cpu"]
    if not ok:
        if REQUIRE_NATIVE:
            pytest.fail(f"LLACA_REQUIRE_NATIVE=1 but the cpu backend is unavailable: {why}")
        pytest.skip(f"cpu backend unavailable: {why}")
    return "cpu"


@pytest.fixture
def cpu_backend() -> str:
    return cpu_backend_or_skip()


def triton_backend_or_skip() -> str:
    ok, why = llaca_optim.backend_status()["triton"]
    if not ok:
        if REQUIRE_NATIVE:  # CI installs triton (the test extra): there it must run
            pytest.fail(f"LLACA_REQUIRE_NATIVE=1 but the triton backend is unavailable: {why}")
        pytest.skip(f"triton backend unavailable: {why}")
    return "triton"


@pytest.fixture
def triton_backend() -> str:
    return triton_backend_or_skip()


def kernel_device() -> str:
    """Where the Triton tests put their tensors: the GPU when there is one, else the CPU
    (through TRITON_INTERPRET=1)."""
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # Fresh random data every run (no fixed expected numbers), reproducible from the seed that a
    # failure report prints: LLACA_TEST_SEED=<seed> pytest ... replays it.
    seed = int(os.environ.get("LLACA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        if report.failed:
            for name, value in item.user_properties:
                if name == "seed":
                    report.sections.append(("random seed", f"torch.manual_seed({value})"))
    return report
