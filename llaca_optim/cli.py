"""``python -m llaca_optim`` (or ``llaca-optim``): what is installed, the demo, the benchmarks.

    python -m llaca_optim info     # versions, toolchain, which backends run here and why not
    python -m llaca_optim demo     # the main job: continual learning, AdamW against LLaCAAdamW
    python -m llaca_optim bench    # the benchmark suite (python -m benchmarks), in a checkout

Arguments after ``demo`` and ``bench`` go to those programs (``demo --help``, ``bench --help``).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path


def _first_line(command: list[str]) -> str | None:
    """The first line of a tool's version output, or None when it is not there."""
    if shutil.which(command[0]) is None:
        return None
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = [line.strip() for line in (out.stdout or out.stderr).splitlines() if line.strip()]
    release = [line for line in lines if "release" in line]  # nvcc: "... release 13.0, V13.0.88"
    return (release or lines or [None])[0]


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(__import__(module), "__version__", "installed")
    except Exception as err:  # noqa: BLE001 - a broken install is what info must report
        return f"fails to import ({type(err).__name__}: {err})"


def info_lines() -> list[str]:
    """What ``info`` prints: one ``name: value`` line each, then one line per backend."""
    import torch

    import llaca_optim
    from llaca_optim import _build

    cuda_home = _build.cuda_home()
    nvcc = _build.nvcc_path()
    lines = [
        f"llaca_optim: {llaca_optim.__version__} ({Path(llaca_optim.__file__).parent})",
        f"python: {platform.python_version()} ({sys.executable})",
        f"torch: {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
        f"{torch.cuda.device_count()} CUDA device(s) visible)",
        f"triton: {_version('triton')}"
        + ("; TRITON_INTERPRET=1 (kernels run through the CPU interpreter)"
           if os.environ.get("TRITON_INTERPRET") == "1" else ""),
        f"C++ compiler: {_first_line([os.environ.get('CXX', 'c++'), '--version']) or 'not found'}",
        f"CUDA toolkit: {cuda_home or 'not found'}"
        + (f" ({_first_line([nvcc, '--version'])})" if nvcc else ""),
        f"threads: {torch.get_num_threads()} (torch.get_num_threads(); OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', 'unset')})",
        f"first-use build cache: {_build.first_use_cache()}",
        "backends (name: runs here? why / what it is):",
    ]
    for name, (ok, why) in llaca_optim.backend_status().items():
        lines.append(f"  {name:<9} {'yes' if ok else 'no ':<3}  {why}")
    for device in ("cpu", "cuda"):
        if device == "cpu" or torch.cuda.is_available():
            lines.append(f"backend='auto' on {device} tensors: "
                         f"{(llaca_optim.available_backends(device) or ['reference'])[0]}")
    return lines


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m llaca_optim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["info", "demo", "bench"])
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args = parser.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "info":
        if rest:
            parser.error("info takes no arguments")
        print("\n".join(info_lines()))
        return 0
    if args.command == "demo":
        from . import demo

        return demo.main(rest)
    # bench: the suite lives in the source checkout's benchmarks/ (not in an installed wheel).
    checkout = Path(__file__).resolve().parents[1]
    if not (checkout / "benchmarks" / "cli.py").exists():
        print("llaca_optim: the benchmark suite is in the source checkout (benchmarks/), which this "
              "installation does not include; clone the repository and run "
              "`python -m llaca_optim bench` from an editable install (pip install -e .)",
              file=sys.stderr)
        return 2
    bench_cli = importlib.import_module(".cli", _benchmarks_package(checkout / "benchmarks").__name__)
    bench_cli.main(rest, prog="python -m llaca_optim bench")
    return 0


def _benchmarks_package(folder: Path):
    """The checkout's ``benchmarks`` package, imported from its folder by path (the checkout is
    not put on ``sys.path``, where its ``tests`` and ``benchmarks`` would shadow other
    packages of those names)."""
    loaded = sys.modules.get("benchmarks")
    if loaded is not None:
        if Path(getattr(loaded, "__file__", "") or "").resolve().parent != folder.resolve():
            raise SystemExit(f"llaca_optim: another package named 'benchmarks' is imported "
                             f"({loaded.__file__}); run `python -m benchmarks` in the checkout")
        return loaded
    spec = importlib.util.spec_from_file_location(
        "benchmarks", folder / "__init__.py", submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["benchmarks"] = module
    spec.loader.exec_module(module)
    return module
