"""The CUDA backend's sources compiled on a machine without a GPU, so CUDA code cannot rot unseen.

Every ``.cu`` file is compiled by nvcc for Ampere (sm_80) and Hopper (sm_90) with the flags of the
real build (llaca_optim/_build.py), and the host file by the C++ compiler, against the headers of
the installed torch. The CPU wheel of torch ships c10's CUDA headers but not one generated file,
``c10/cuda/impl/cuda_cmake_macros.h``; the test writes a stand-in (one line, the same macro a CUDA
build of torch defines). The kernels are run, on the CPU, by tests/backends/test_cuda_backend.py.

What the GPU code must look like is checked here too, from ptxas's report and the PTX:
no register spills or local memory, 128-bit global loads and stores in every kernel, and no
generic-address-space accesses.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

from llaca_optim import _build

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
ARCHS = ("80", "90")

TOOLKIT = _build.cuda_home()
NVCC = _build.nvcc_path()
pytestmark = [pytest.mark.skipif(TOOLKIT is None, reason="no CUDA toolkit (nvcc and its headers)"), pytest.mark.build, pytest.mark.slow, pytest.mark.extended, pytest.mark.xdist_group("test_cuda_compile")]


@pytest.fixture(scope="module")
def include_flags(tmp_path_factory) -> list[str]:
    shim = tmp_path_factory.mktemp("shim")
    macros = shim / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    dirs = [*_build.include_dirs(CSRC), str(shim), *cpp_extension.include_paths()]
    toolkit = Path(TOOLKIT) / "include"
    return [f"-I{d}" for d in [*dirs, toolkit]] + [
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"]


def _nvcc(source: str, include_flags: list[str], out: Path, *extra: str) -> subprocess.Popen:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    command = [NVCC, *_build.nvcc_flags(), *gencode, *include_flags, "-Xptxas", "-v", "-c",
               source, "-o", str(out), *extra]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def objects(include_flags, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """Every .cu file compiled for sm_80 and sm_90 (in parallel): {source: (object, nvcc log)}."""
    sources = [s for s in _build.cuda_sources(CSRC) if s.endswith(".cu")]
    assert {Path(s).name for s in sources} == {"step_fp32.cu", "step_bf16.cu", "step_fp16.cu"}
    out = tmp_path_factory.mktemp("objects")
    runs = {s: (out / (Path(s).stem + ".o"), _nvcc(s, include_flags, out / (Path(s).stem + ".o")))
            for s in sources}
    built = {}
    for source, (obj, run) in runs.items():
        log = run.communicate()[0]
        assert run.returncode == 0, f"nvcc failed on {source}:\n{log[-6000:]}"
        built[source] = (obj, log)
    return built


def test_every_cu_file_compiles_for_sm80_and_sm90_without_spills(objects):
    for source, (_, log) in objects.items():
        kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", log)
        # 5 step kernels (2 EMA dtypes for fp32 collapse into one) + blend kernels, per arch
        assert len(kernels) >= 2 * 6, f"{source}: fewer kernels than expected:\n{log[-3000:]}"
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert spills and all(int(n) == 0 for n in spills), f"{source} spills registers:\n{log[-3000:]}"


def _cuobjdump() -> str | None:
    """The toolkit's cuobjdump, else the one Triton's wheel ships (CI has Triton, not cuobjdump)."""
    found = shutil.which("cuobjdump") or (TOOLKIT and shutil.which("cuobjdump", path=f"{TOOLKIT}/bin"))
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    shipped = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(shipped) if shipped.exists() else None


def _elements_per_thread() -> int:
    return int(re.search(r"constexpr int kElemsPerThread = (\d+);",
                         (CSRC / "cuda" / "kernel_args.h").read_text()).group(1))


def test_every_fragment_issues_its_loads_before_its_stores(objects):
    """NOTE [CUDA loads before stores] in csrc/cuda/kernel_args.h, read off the machine code: in each
    kernel, the global loads between two stores ("load runs", memory round trips in a row) number
    one per 16-byte fragment a thread handles (kElemsPerThread / elements per 16 bytes), plus one
    for the partial sums of a tensor's last block; amsgrad kernels load the previous gradient
    after their stores (one more run per fragment). The blend and flush kernels load every
    fragment first: one run. Loads interleaved with stores would each wait a round trip more."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or Triton's wheel) to read the machine code")
    per_thread = _elements_per_thread()
    checked = 0
    for source, (obj, _) in objects.items():
        sass = subprocess.run([tool, "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
        element_bytes = 4 if "fp32" in source else 2
        fragments = per_thread // (16 // element_bytes)
        for body in re.split(r"\n\s*Function : ", sass)[1:]:
            name = body.split("\n", 1)[0].strip()
            accesses = "".join("L" if op == "LDG" else "S" for op in re.findall(r"\b(LDG|STG)\.", body))
            load_runs = len(re.findall("L+", accesses))
            step = re.search(r"step_chunks.*Lb(\d)ELb(\d)ELb(\d)E", name)
            if step:
                _, amsgrad, llaca = (flag == "1" for flag in step.groups())
                allowed = fragments * (2 if amsgrad and llaca else 1) + (1 if llaca else 0)
            else:
                allowed = 1
            assert load_runs <= allowed, (
                f"{Path(source).name} {name}: {load_runs} runs of loads between stores, at most "
                f"{allowed} expected (NOTE [CUDA loads before stores]): {accesses}")
            checked += 1
    # fp32: 7 kernels; bf16 and fp16: 7 per EMA dtype (fp32 or their own); two archs each
    assert checked == 2 * (7 + 14 + 14), f"{checked} kernels found in the machine code, not 70"


def test_ptx_has_128_bit_accesses_and_no_local_memory(include_flags, tmp_path):
    ptx = tmp_path / "bf16.ptx"
    command = [NVCC, *_build.nvcc_flags(), "-arch=compute_90", *include_flags, "-ptx",
               str(CSRC / "cuda" / "step_bf16.cu"), "-o", str(ptx)]
    run = subprocess.run(command, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    text = ptx.read_text()
    entries = re.split(r"\.entry\s+", text)[1:]
    assert entries, "no kernels in the PTX"
    for body in entries:
        name = body.split("(", 1)[0]
        assert "ld.global.v4" in body or "ld.global.nc.v4" in body, f"{name}: no 128-bit loads"
        assert "st.global.v4" in body, f"{name}: no 128-bit stores"
        assert "ld.local" not in body and "st.local" not in body, f"{name}: uses local memory"
        # Generic accesses (no state space) cost an address-space check each: every pointer the
        # kernels dereference comes from the tensor table and is declared global.
        generic = re.findall(r"\t(?:ld|st)\.(?:v[24]\.)?[bfsu]\d+\s", body)
        assert not generic, f"{name}: generic loads/stores {generic[:4]}"


def test_host_code_compiles(include_flags, tmp_path):
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    for source in (s for s in _build.cuda_sources(CSRC) if s.endswith(".cpp")):
        run = subprocess.run([compiler, f"-std=c++{_build.cxx_standard()}", "-fsyntax-only", *include_flags, source],
                             capture_output=True, text=True)
        assert run.returncode == 0, f"{source}:\n{run.stderr[-6000:]}"


def test_build_switches(monkeypatch):
    monkeypatch.setenv("LLACA_SKIP_CUDA", "1")
    assert _build.build_cuda() == (False, "LLACA_SKIP_CUDA=1")
    monkeypatch.delenv("LLACA_SKIP_CUDA")
    if torch.version.cuda is None:
        assert _build.build_cuda()[0] is False and "CPU-only" in _build.build_cuda()[1]
    monkeypatch.setenv("LLACA_CUDA_ARCH", "8.0;9.0")
    assert _build.cuda_arch_flags() == [
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90"]
