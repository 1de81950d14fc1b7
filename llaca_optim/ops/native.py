"""Loading the native extension: the installed build, else a build on first use, else nothing.

The extension is optional at import. ``load()`` never raises; it returns whether the
kernels are registered and, when not, a sentence saying why and how to get them, which the
backend registry (registry.py) shows in its errors and in the one warning that "auto" gives.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
import threading
import time

_lock = threading.Lock()
_result: tuple[bool, str] | None = None


def _build_on_first_use() -> None:
    from .. import _build

    root = _build.source_root()
    with_cuda, _ = _build.build_cuda()
    if with_cuda:
        _build.use_cuda_toolkit()
    from torch.utils import cpp_extension

    name = "llaca_optim_jit_cuda_C" if with_cuda else "llaca_optim_jit_C"
    # Said before the compiler runs: a first build takes a while, a cached one a second.
    print(f"llaca_optim: the package was installed without its native kernels; building them now "
          f"({'CPU and CUDA kernels: several minutes' if with_cuda else 'CPU kernels: about 30 s'} "
          f"the first time, cached in {_build.first_use_cache()}; "
          "`pip install --no-build-isolation .` from a checkout installs them prebuilt)",
          file=sys.stderr, flush=True)
    start = time.perf_counter()
    cpp_extension.load(
        # A sanitized build (tests/toolchain/test_sanitizers.py) is cached apart from the plain one.
        name=name + ("_sanitized" if _build.sanitizer_flags() else ""),
        sources=_build.cpu_sources(root) + (_build.cuda_sources(root) if with_cuda else []),
        extra_include_paths=_build.include_dirs(root),
        extra_cflags=_build.cxx_flags(),
        extra_cuda_cflags=_build.nvcc_flags() if with_cuda else None,
        extra_ldflags=_build.link_flags(),
        verbose=os.environ.get("LLACA_VERBOSE_BUILD", "0") == "1",
    )
    print(f"llaca_optim: native kernels ready ({time.perf_counter() - start:.0f} s)",
          file=sys.stderr, flush=True)


def load() -> tuple[bool, str]:
    """Returns ``(loaded, reason)``; loads at most once per process."""
    global _result
    with _lock:
        if _result is not None:
            return _result
        _result = _load_uncached()
        return _result


def _load_uncached() -> tuple[bool, str]:
    import torch  # noqa: F401  (the extension links against libtorch; load it first)

    from . import library  # noqa: F401  (schemas first, then the kernels that implement them)

    if os.environ.get("LLACA_FORCE_JIT", "0") != "1":
        try:
            importlib.import_module("llaca_optim._C")
            return True, "installed build (llaca_optim._C)"
        except ImportError as err:
            installed_error = str(err)
    else:
        installed_error = "LLACA_FORCE_JIT=1"
    if os.environ.get("LLACA_NO_JIT", "0") == "1":
        return False, (
            f"the package was installed without its native kernels ({installed_error}) and "
            "LLACA_NO_JIT=1 forbids building them now; reinstall with "
            "`pip install --no-build-isolation .` from a source checkout"
        )
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return False, (
            f"the package was installed without its native kernels ({installed_error}) and no "
            "C++ compiler was found to build them on first use; install g++ (or set CXX) and "
            "ninja, or reinstall with `pip install --no-build-isolation .` on a machine that has one"
        )
    try:
        _build_on_first_use()
    except Exception as err:  # noqa: BLE001 - any build failure means "not available", said once
        return False, (
            f"building the native kernels on first use failed ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[-1] if str(err).strip() else err!r}); "
            "rerun with LLACA_VERBOSE_BUILD=1 to see the compiler output"
        )
    return True, "built on first use (torch.utils.cpp_extension, cached)"
