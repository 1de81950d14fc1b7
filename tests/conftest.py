"""Fixtures and hooks of the test suite; what the tests share is in tests/support/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, the Triton kernels run through Triton's interpreter on CPU tensors. It must be
# switched on before triton compiles (decorates) any kernel, so before llaca_optim loads them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support.backends import backend_or_skip, backend_value  # noqa: E402

# Under pytest-xdist (the README's `pytest -n 2`) every worker is a process of its own: one torch
# thread each keeps the workers from oversubscribing the cores they share. The sanitizer check
# (`extended`) reruns the kernels' tests in a child with torch's own thread count.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# Markers: each module marks itself (`pytestmark`): `build` (compilers, CMake, sanitizer builds),
# `gpu` (needs one), `slow` (subprocesses, trainers, launches), `extended` (the long checks
# .ci/run adds after the README's test command), and `xdist_group(<module>)` for a module whose
# tests share a costly module-scoped fixture (a launch of ranks, a batch of nvcc compiles), so
# that under pytest-xdist (`--dist loadgroup`) it stays on one worker and runs once. Set here:
# `slow` on every Triton test that runs through the interpreter (each program runs in Python).
# `pytest -m "not slow and not build"` is the quick subset.
TESTS = Path(__file__).resolve().parent
# The modules that group themselves, read from their own text: the controller (below) sees ids
# only, not marks.
SHARED_FIXTURE_MODULES = tuple(sorted(
    p.name for p in TESTS.rglob("test_*.py") if "pytest.mark.xdist_group(" in p.read_text()))


# A wrapper: the marks are set before pytest-xdist's own hook of this name reads the xdist_group
# marks (under `--dist loadgroup` it appends the group to each test's id, which is what groups
# them).
@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    _mark(items)
    return (yield)


def pytest_xdist_node_collection_finished(node, ids):
    # pytest 9.2 ignores the id pytest-xdist 3.8 rewrites (pytest-dev/pytest-xdist#1386), and
    # loadgroup then scatters a group's tests over the workers, each setting up the costly module
    # fixture. Said here, on the controller, where a message reaches the user.
    if node.config.getvalue("dist") != "loadgroup":
        return
    scattered = [i for i in ids if i.split("::")[0].endswith(SHARED_FIXTURE_MODULES) and "@" not in i]
    if scattered:
        pytest.exit(f"--dist loadgroup did not group {scattered[0]}: pytest {pytest.__version__} "
                    "with this pytest-xdist loses the groups (pytest-dev/pytest-xdist#1386). "
                    "pip install 'pytest<9.2', as the test extra pins, or run without -n.",
                    returncode=pytest.ExitCode.USAGE_ERROR)


def _mark(items):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    for item in items:
        if "triton" in item.nodeid:
            item.add_marker("slow")


@pytest.fixture
def cpu_backend() -> str:
    return backend_or_skip("cpu")


@pytest.fixture
def triton_backend() -> str:
    return backend_or_skip("triton")


@pytest.fixture
def backend(request):
    """The ``backend=`` argument of one backend under test; parametrize it with
    ``support.backends.backends()`` and ``indirect=True``."""
    return backend_value(request.param)


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
