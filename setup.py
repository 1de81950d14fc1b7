"""Builds the native kernels; everything else is in pyproject.toml.

Sources, include paths and flags come from llaca_optim/_build.py, the one description of the
native build (also used when the kernels are built on first use). Switches:

* ``LLACA_SKIP_NATIVE=1``: install the pure-Python package only (kernels are then built on first
  use if a compiler is present, else the reference backend is used).
* ``LLACA_CPU_ARCH``: ``-march`` for the CPU kernels (default ``native``).
* ``LLACA_SKIP_CUDA=1``: no CUDA kernels even where torch has CUDA and nvcc is present.
* ``LLACA_CUDA_ARCH``: GPU architectures of the CUDA kernels, e.g. ``"8.0;9.0"``.
"""

import importlib.util
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def _load_build_description():
    # Imported by path: the package itself cannot be imported before it is installed.
    spec = importlib.util.spec_from_file_location("_llaca_build", ROOT / "llaca_optim" / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithSources(build_py):
    """Ships csrc/ inside the package as llaca_optim/_csrc, so an installed copy can still build
    its kernels on first use."""

    def run(self):
        super().run()
        target = Path(self.build_lib) / "llaca_optim" / "_csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


def native_extensions():
    if os.environ.get("LLACA_SKIP_NATIVE", "0") == "1":
        return [], {}
    build = _load_build_description()
    root = build.source_root()
    with_cuda, why = build.build_cuda()
    if with_cuda:  # before torch's build reads CUDA_HOME (_build.cuda_home says why)
        build.use_cuda_toolkit()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    print(f"llaca_optim: CUDA kernels {'included' if with_cuda else 'skipped'} ({why})")
    sources = build.cpu_sources(root) + (build.cuda_sources(root) if with_cuda else [])
    kind = CUDAExtension if with_cuda else CppExtension
    compile_args = {"cxx": build.cxx_flags()}
    if with_cuda:
        compile_args["nvcc"] = build.nvcc_flags()
    extension = kind(
        name="llaca_optim._C",
        sources=[os.path.relpath(s, ROOT) for s in sources],
        include_dirs=build.include_dirs(root),
        extra_compile_args=compile_args,
        extra_link_args=build.link_flags(),
    )
    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


extensions, commands = native_extensions()
setup(ext_modules=extensions, cmdclass={"build_py": BuildPyWithSources, **commands})
