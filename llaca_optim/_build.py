"""The one description of the native build: which sources, which include paths, which flags.

``setup.py`` (what users run), the build-on-first-use path (``ops/native.py``) and
CMakeLists.txt (a C++ developer build for IDEs and tooling, see docs/building.md) all take everything
from here, so a source file is added by creating it under ``csrc/`` and nowhere else, and every
build compiles with the same flags (which the kernels' numerics depend on: ``-ffp-contract=off``,
``--fmad=false``). CMake reads it by running this file: ``python llaca_optim/_build.py --cmake``
prints the description as CMake ``set()`` lines.

Environment switches:

* ``LLACA_CPU_ARCH``: the ``-march`` value for the CPU kernels (default ``native``, right for a
  build that runs where it is made; set e.g. ``x86-64-v3`` for a wheel that travels, or an empty
  string for the compiler's default).
* ``LLACA_SKIP_CUDA=1``: build the CPU kernels only, even where torch has CUDA and nvcc is found.
* ``LLACA_CUDA_ARCH``: the GPU architectures of the CUDA kernels, e.g. ``"8.0;9.0"`` (default:
  torch's own choice, ``TORCH_CUDA_ARCH_LIST`` or the GPUs of the build machine).
* ``LLACA_SANITIZE``: GCC sanitizers for the C++ build, e.g. ``address,undefined`` (a developer
  check, see ``sanitizer_flags``).
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def source_root() -> Path:
    """``csrc/`` of a source checkout, or the copy that setup.py puts into an installed package."""
    for candidate in (PACKAGE_DIR.parent / "csrc", PACKAGE_DIR / "_csrc"):
        if (candidate / "llaca_module.cpp").is_file():
            return candidate
    raise FileNotFoundError(
        "llaca_optim: the C++ sources (csrc/) are not next to the package; reinstall from a "
        "source checkout or an sdist to build the native kernels"
    )


def cpu_sources(root: Path) -> list[str]:
    return [str(p) for p in [root / "llaca_module.cpp", *sorted((root / "cpu").glob("*.cpp"))]]


def cuda_sources(root: Path) -> list[str]:
    """The CUDA backend: its host code (``ops_cuda.cpp``) and one ``.cu`` per parameter dtype."""
    return [str(p) for p in [*sorted((root / "cuda").glob("*.cpp")), *sorted((root / "cuda").glob("*.cu"))]]


def include_dirs(root: Path) -> list[str]:
    return [str(root / "include")]


# Where a toolkit lives when neither CUDA_HOME nor CUDA_PATH says (torch's own last guess too).
DEFAULT_CUDA_HOMES = ("/usr/local/cuda",)


def cuda_home() -> str | None:
    """The CUDA toolkit to build with: CUDA_HOME or CUDA_PATH when set, else the first folder
    with both ``bin/nvcc`` and ``include/cuda_runtime.h`` among /usr/local/cuda and the toolkit
    that the nvcc on PATH resolves into (through symbolic links).

    torch's build guesses the toolkit as the folder above the first nvcc on PATH. Where that
    nvcc is a wrapper script (``/usr/local/bin/nvcc`` running ``/usr/local/cuda-13.0/bin/nvcc``,
    as some machine images install it), the guess is ``/usr/local``: nvcc itself still
    works, but the host compiler is given ``/usr/local/include`` and cannot find
    ``cuda_runtime.h``, and the link looks for libcudart in ``/usr/local/lib64``."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return os.environ[name]
    import shutil

    candidates = list(DEFAULT_CUDA_HOMES)
    on_path = shutil.which("nvcc")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent.parent))
    for home in candidates:
        if (Path(home) / "bin" / "nvcc").is_file() and (Path(home) / "include" / "cuda_runtime.h").is_file():
            return home
    return None


def nvcc_path() -> str | None:
    """The toolkit's nvcc (cuda_home), else the first nvcc on PATH."""
    import shutil

    home = cuda_home()
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return shutil.which("nvcc")


def first_use_cache() -> str:
    """Where a build on first use keeps its objects (torch.utils.cpp_extension's folder)."""
    from torch.utils import cpp_extension

    return os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()


def use_cuda_toolkit() -> str | None:
    """Points torch's extension build at cuda_home() (its include and library folders, its
    nvcc) and returns it. Call before a CUDA build: CUDA_HOME is set for torch.utils.cpp_extension
    to read when it is imported, and its already-imported guess is replaced."""
    home = cuda_home()
    if home is None:
        return None
    os.environ["CUDA_HOME"] = home
    import sys

    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    if cpp_extension is not None:
        cpp_extension.CUDA_HOME = home
    return home


def build_cuda() -> tuple[bool, str]:
    """Whether to build the CUDA kernels, and why (not)."""
    if os.environ.get("LLACA_SKIP_CUDA", "0") == "1":
        return False, "LLACA_SKIP_CUDA=1"
    import torch

    if torch.version.cuda is None:
        return False, f"this torch ({torch.__version__}) is a CPU-only build"
    nvcc = nvcc_path()
    if nvcc is None:
        return False, "nvcc was not found (set CUDA_HOME to the CUDA toolkit)"
    return True, f"torch {torch.__version__} with CUDA {torch.version.cuda}, toolkit {cuda_home() or nvcc}"


def cxx_standard() -> int:
    """The C++ standard that torch's headers are written for, as torch's CMake package declares
    it (``CXX_STANDARD`` in TorchConfig.cmake: 17 in torch 2.11, 20 in 2.13 and 2.14, whose
    torch.utils.cpp_extension passes the same); 17 where it declares none. Every compile that
    torch's build does not flag itself takes it from here: nvcc, CMake, the tests' compiles."""
    import re

    import torch.utils

    config = Path(torch.utils.cmake_prefix_path) / "Torch" / "TorchConfig.cmake"
    found = re.search(r"CXX_STANDARD\s+(\d+)", config.read_text()) if config.is_file() else None
    return int(found.group(1)) if found else 17


def nvcc_flags(with_arch: bool = True) -> list[str]:
    """``with_arch=False``: without the -gencode flags (CMake sets CMAKE_CUDA_ARCHITECTURES)."""
    # --fmad=false: no a*b+c contraction, so the GPU rounds as the CPU kernels (-ffp-contract=off)
    # and torch's element-wise ops do; -prec-div / -prec-sqrt stay at their IEEE defaults.
    flags = ["-O3", "-DNDEBUG", "--fmad=false", f"-std=c++{cxx_standard()}", "-lineinfo"]
    return flags + (cuda_arch_flags() if with_arch else [])


def cuda_archs() -> list[str]:
    """LLACA_CUDA_ARCH ("8.0;9.0" or "8.0,9.0") as compute capabilities without the dot."""
    archs = os.environ.get("LLACA_CUDA_ARCH", "").replace(",", ";").split(";")
    return [a.strip().replace(".", "") for a in archs if a.strip()]


def cuda_arch_flags() -> list[str]:
    archs = cuda_archs()
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    if archs:  # PTX of the newest, so later GPUs can JIT it
        flags.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
    return flags


def cxx_flags() -> list[str]:
    # -fno-math-errno and -fno-trapping-math change no result (only errno and FP exception flags)
    # but let GCC vectorise sqrt and the selects of the element loop. -ffp-contract=off keeps GCC
    # from fusing a*b+c into one FMA (one rounding instead of two): the kernels then round like
    # torch's element-wise ops, which the parity tests compare against (the step is memory-bound,
    # so the FMAs would buy no time).
    flags = ["-O3", "-fopenmp", "-DNDEBUG", "-fno-math-errno", "-fno-trapping-math",
             "-ffp-contract=off"]
    arch = os.environ.get("LLACA_CPU_ARCH", "native").strip()
    if arch:
        flags.append(f"-march={arch}")
    return flags + sanitizer_flags()


def link_flags() -> list[str]:
    # libgomp resolves to the copy that torch already loaded (same soname), so the kernels share
    # torch's OpenMP thread pool and at::get_num_threads().
    return ["-fopenmp"] + sanitizer_flags(link=True)


def sanitizer_flags(link: bool = False) -> list[str]:
    """``LLACA_SANITIZE=address,undefined``: GCC's sanitizers in the CPU kernels' build (and in the
    tests' build of the CUDA kernels for the CPU emulation), for tests/toolchain/test_sanitizers.py; ``link``:
    the linker's part. Python itself is not instrumented, so the process must preload the runtime
    (LD_PRELOAD=libasan.so)."""
    kinds = os.environ.get("LLACA_SANITIZE", "").strip()
    if not kinds:
        return []
    compile_only = [] if link else ["-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g"]
    return [f"-fsanitize={kinds}", *compile_only]


def cmake_settings() -> str:
    """This description as CMake ``set()`` lines (paths absolute, lists ;-separated). Only the
    architectures stay CMake's: LLACA_CUDA_ARCH becomes CMAKE_CUDA_ARCHITECTURES there.
    LLACA_CUDA_HOME is cuda_home(), empty when no toolkit is found."""
    root = source_root()
    settings = {
        "LLACA_CPU_SOURCES": cpu_sources(root),
        "LLACA_CUDA_SOURCES": cuda_sources(root),
        "LLACA_INCLUDE_DIRS": include_dirs(root),
        "LLACA_CXX_FLAGS": cxx_flags(),
        "LLACA_NVCC_FLAGS": nvcc_flags(with_arch=False),
        "LLACA_LINK_FLAGS": link_flags(),
        "LLACA_CUDA_ARCHITECTURES": cuda_archs(),
        "LLACA_CUDA_HOME": [home] if (home := cuda_home()) else [],
        "LLACA_CXX_STANDARD": [str(cxx_standard())],
    }
    return "".join(f'set({name} "{";".join(values)}")\n' for name, values in settings.items())


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--cmake"]:
        sys.exit("usage: python llaca_optim/_build.py --cmake   (the build description for CMake)")
    sys.stdout.write(cmake_settings())
