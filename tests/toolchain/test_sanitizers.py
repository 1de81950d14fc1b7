"""The native kernels under AddressSanitizer and UndefinedBehaviorSanitizer.

The CPU kernels and the CUDA kernels (through their CPU emulation, tests/cuda_sim/) are rebuilt
with ``-fsanitize=address,undefined`` (``LLACA_SANITIZE``, llaca_optim/_build.py), and the tests
that drive them hardest run again in a child process that preloads the sanitizers' runtimes
(Python itself is not instrumented). A read or write past a tensor's end (a vector load in a
tail, a chunk or table index off by one), a use after free, or undefined behaviour in the kernels
or their host code (tables, workspace cache) stops the child with the sanitizer's report, which
this test then prints. It is the CPU-side counterpart of compute-sanitizer's memcheck on a GPU
(benchmarks/gpu_run.sh), which sees what the emulation cannot: the real compiler, the memory
model and device addresses. Its first run found a memcpy from a null pointer in the CUDA
workspace's table builder (csrc/cuda/workspace.h).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.build, pytest.mark.slow, pytest.mark.extended]

ROOT = Path(__file__).resolve().parents[2]

# Chosen for what they reach in the native code per second under the sanitizers (which slow the
# references' Python-side torch work far more than the kernels): every CUDA-emulation case, the
# deferred blends of both native backends, and the CPU kernels' parity grid at one preset (every
# dtype, amsgrad and maximize). One pytest run each, since -k applies to a whole command line.
RUNS = [
    ["tests/backends/test_cuda_backend.py"],
    ["tests/backends/test_deferred_blend.py", "-k", "not triton"],
    ["tests/backends/test_parity.py::test_fused_adamw_matches_reference", "-k", "adaptive and coin and 0.05"],
]


def _runtime(name: str) -> str | None:
    """The sanitizer runtime of the compiler that builds the kernels, or None."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None
    found = subprocess.run([compiler, f"-print-file-name={name}"], capture_output=True,
                           text=True).stdout.strip()
    return found if os.path.isabs(found) and os.path.isfile(found) else None


def test_kernels_run_clean_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    runtimes = [_runtime("libasan.so"), _runtime("libubsan.so")]
    if None in runtimes:
        pytest.skip("the C++ compiler has no libasan/libubsan runtime (Debian: libasan8, "
                    "libubsan1; they come with g++)")
    logs = tmp_path / "reports"
    logs.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},  # a plain run
        "LLACA_SANITIZE": "address,undefined",
        "LLACA_FORCE_JIT": "1",      # the installed build is not instrumented
        "LLACA_SKIP_CUDA": "1",      # CPU kernels only; the CUDA kernels run in the emulation
        "LLACA_REQUIRE_NATIVE": "1",
        "LD_PRELOAD": ":".join(runtimes),
        # No leak check: CPython and torch keep allocations alive until exit by design.
        "ASAN_OPTIONS": f"detect_leaks=0:log_path={logs / 'asan'}",
        "UBSAN_OPTIONS": f"print_stacktrace=1:log_path={logs / 'ubsan'}",
    }
    for part in RUNS:
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             *part],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200,
        )
        reports = "\n".join(p.read_text(errors="replace") for p in sorted(logs.iterdir()))
        assert run.returncode == 0 and not reports, (
            f"sanitized run of {' '.join(part)} failed (rc={run.returncode})\n"
            f"--- sanitizer reports ---\n{reports[:8000]}\n"
            f"--- output ---\n{(run.stdout + run.stderr)[-6000:]}"
        )
        assert " passed" in run.stdout, run.stdout[-2000:]
