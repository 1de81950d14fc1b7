"""The CPU kernels' own bf16/fp16 conversions (csrc/cpu/convert.h) against c10's.

The kernels do not use c10::BFloat16 / c10::Half in their element loops because those kept GCC from
vectorising them; this checks that the replacements round exactly like c10 (every 16-bit pattern
widened, every rounding boundary and the whole fp16-subnormal range narrowed, plus random
patterns). It compiles tests/toolchain/cpp/check_convert.cpp with the kernels' own flags and runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
from torch.utils import cpp_extension

from llaca_optim import _build

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.build]

ROOT = _build.PACKAGE_DIR.parent


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="no C++ compiler")
def test_conversions_match_c10_bit_for_bit(tmp_path):
    compiler = shutil.which("g++") or shutil.which("c++")
    exe = tmp_path / "check_convert"
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags = [f for f in _build.cxx_flags() if f != "-fopenmp"]
    build = subprocess.run(
        [compiler, f"-std=c++{_build.cxx_standard()}", *flags, *includes, f"-I{ROOT / 'csrc' / 'cpu'}",
         str(ROOT / "tests" / "toolchain" / "cpp" / "check_convert.cpp"), "-o", str(exe)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    sys.stdout.write(run.stdout)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr
