"""Shared fixtures and helpers of the test suite.

CI sets LLACA_REQUIRE_NATIVE=1: there a missing CPU extension is a failure, not a skip.
"""

from __future__ import annotations

import os

import pytest
import torch

import llaca_optim

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
