"""The Triton kernels compiled for a Hopper GPU (sm_90) on a machine without one.

The interpreter that runs the Triton parity tests on a CPU is more lenient than Triton's compiler
(it let a non-constexpr global through, which the GPU compile rejected), so every kernel variant
is also compiled down to a cubin here; see tests/toolchain/triton_compile_check.py. Nothing is launched.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.build, pytest.mark.slow, pytest.mark.extended]

pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # also silences Triton's warning about it
    script = Path(__file__).with_name("triton_compile_check.py")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), (
        run.stdout[-3000:] + run.stderr[-5000:])
