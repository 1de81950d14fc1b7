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


def backend_or_skip(name: str) -> str:
    """``name`` if that backend can run here; else a skip, or a failure in CI (which builds the
    extension and installs triton, so both must run there)."""
    ok, why = llaca_optim.backend_status()[name]
    if not ok:
        if REQUIRE_NATIVE:
            pytest.fail(f"LLACA_REQUIRE_NATIVE=1 but the {name} backend is unavailable: {why}")
        pytest.skip(f"{name} backend unavailable: {why}")
    return name


@pytest.fixture
def cpu_backend() -> str:
    return backend_or_skip("cpu")


@pytest.fixture
def triton_backend() -> str:
    return backend_or_skip("triton")


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
