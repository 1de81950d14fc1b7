"""The one description of the native build: which sources, which include paths, which flags.

``setup.py`` (what users run) and the build-on-first-use path (``backends/_native.py``) both take
everything from here, so a source file is added by creating it under ``csrc/`` and nowhere else.
CMakeLists.txt has a different job (a C++ developer build for IDEs and tooling, see the README);
it globs the same folders and keeps no list of its own.

Environment switches:

* ``LLACA_CPU_ARCH``: the ``-march`` value for the CPU kernels (default ``native``, right for a
  build that runs where it is made; set e.g. ``x86-64-v3`` for a wheel that travels, or an empty
  string for the compiler's default).
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


def include_dirs(root: Path) -> list[str]:
    return [str(root / "include")]


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
    return flags


def link_flags() -> list[str]:
    # libgomp resolves to the copy that torch already loaded (same soname), so the kernels share
    # torch's OpenMP thread pool and at::get_num_threads().
    return ["-fopenmp"]
