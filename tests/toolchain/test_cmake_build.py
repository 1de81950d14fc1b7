"""CMakeLists.txt (the C++ developer build for IDEs and tooling) builds the same sources with the
same flags as setup.py: both read llaca_optim/_build.py. The flags matter to the numerics
(-ffp-contract=off keeps the CPU kernels rounding like torch's element-wise ops), so a CMake
build that compiled without them would give other bits. Configured and built here with CMake,
where it is installed."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llaca_optim import _build

ROOT = _build.PACKAGE_DIR.parent
CMAKE = shutil.which("cmake")
pytestmark = [pytest.mark.skipif(CMAKE is None, reason="cmake is not installed"), pytest.mark.build, pytest.mark.slow, pytest.mark.extended]


def _toolkit_lacks_what_torch_links() -> str | None:
    """Against a CUDA build of torch, find_package(Torch) needs the toolkit's libraries too
    (cudart, nvrtc), which a compiler-only toolkit lacks; torch's own copies in pip's nvidia
    packages are not where its CMake files look."""
    if torch.version.cuda is None:
        return None
    home = _build.cuda_home()
    libs = [p.name for d in ("lib64", "lib") for p in (Path(home or "/nonexistent") / d).glob("lib*.so*")]
    for name in ("cudart", "nvrtc"):
        if not any(lib.startswith(f"lib{name}.so") for lib in libs):
            return f"torch {torch.__version__} is a CUDA build and the toolkit ({home}) has no lib{name}"
    return None


def test_cmake_builds_the_sources_of_setup_py_with_its_flags(tmp_path):
    if (why := _toolkit_lacks_what_torch_links()) is not None:
        pytest.skip(why)
    build = tmp_path / "cmake"
    subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build),
                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
                    f"-DPython3_EXECUTABLE={sys.executable}"],
                   check=True, capture_output=True, text=True)
    commands = json.loads((build / "compile_commands.json").read_text())
    root = _build.source_root()
    assert {str(Path(c["file"]).resolve()) for c in commands} == set(_build.cpu_sources(root))
    for c in commands:
        argv = shlex.split(c["command"])
        missing = [f for f in _build.cxx_flags() if f not in argv]
        assert not missing, f"{c['file']}: CMake compiles without {missing}"
        for include in _build.include_dirs(root):
            assert f"-I{include}" in argv or include in argv, f"{c['file']}: no {include}"

    done = subprocess.run([CMAKE, "--build", str(build), "-j2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (build / "_C.so").is_file()


def test_build_description_for_cmake_names_every_setting():
    done = subprocess.run([sys.executable, str(ROOT / "llaca_optim" / "_build.py"), "--cmake"],
                          capture_output=True, text=True, check=True)
    names = [line.split("(", 1)[1].split(" ", 1)[0] for line in done.stdout.splitlines()]
    assert names == ["LLACA_CPU_SOURCES", "LLACA_CUDA_SOURCES", "LLACA_INCLUDE_DIRS",
                     "LLACA_CXX_FLAGS", "LLACA_NVCC_FLAGS", "LLACA_LINK_FLAGS",
                     "LLACA_CUDA_ARCHITECTURES", "LLACA_CUDA_HOME", "LLACA_CXX_STANDARD"]
    assert "--fmad=false" in done.stdout and "-ffp-contract=off" in done.stdout
