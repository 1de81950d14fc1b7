"""Which CUDA toolkit the build uses (``_build.cuda_home``), and that torch's extension build is
pointed at it (``_build.use_cuda_toolkit``, called by setup.py and the build on first use).

Found when the package was built against a CUDA build of torch on a machine whose ``nvcc`` on
PATH is a wrapper script in /usr/local/bin: torch guessed the toolkit as /usr/local and the host
compiler could not find ``cuda_runtime.h``. The layouts here are made in a temporary folder, so
these checks need no toolkit.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from torch.utils import cpp_extension

from llaca_optim import _build

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.build]


def _toolkit(root: Path) -> Path:
    """A folder laid out as a CUDA toolkit, as far as the lookup reads it."""
    (root / "bin").mkdir(parents=True)
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(0o755)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    return root


@pytest.fixture
def bare(tmp_path, monkeypatch) -> Path:
    """No CUDA_HOME / CUDA_PATH, no default toolkit, and PATH one empty folder (returned),
    ``local/bin`` as /usr/local/bin is."""
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(_build, "DEFAULT_CUDA_HOMES", (str(tmp_path / "no-default-toolkit"),))
    path = tmp_path / "local" / "bin"
    path.mkdir(parents=True)
    monkeypatch.setenv("PATH", str(path))
    return path


def test_a_wrapper_script_on_path_is_not_taken_for_the_toolkit(tmp_path, monkeypatch, bare):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    (tmp_path / "cuda").symlink_to(toolkit)
    wrapper = bare / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {toolkit}/bin/nvcc "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setattr(_build, "DEFAULT_CUDA_HOMES", (str(tmp_path / "cuda"),))
    assert _build.cuda_home() == str(tmp_path / "cuda")
    assert _build.nvcc_path() == str(tmp_path / "cuda" / "bin" / "nvcc")
    if hasattr(cpp_extension, "_find_cuda_home"):  # torch's own guess: the folder above PATH's nvcc
        assert cpp_extension._find_cuda_home() == str(bare.parent)


def test_an_nvcc_linked_into_a_toolkit_resolves_to_that_toolkit(tmp_path, bare):
    toolkit = _toolkit(tmp_path / "opt" / "cuda-12.8")
    (bare / "nvcc").symlink_to(toolkit / "bin" / "nvcc")
    assert _build.cuda_home() == str(toolkit)
    assert _build.nvcc_path() == str(toolkit / "bin" / "nvcc")


def test_cuda_home_or_cuda_path_set_by_the_user_wins(tmp_path, monkeypatch, bare):
    _toolkit(tmp_path / "cuda")
    monkeypatch.setattr(_build, "DEFAULT_CUDA_HOMES", (str(tmp_path / "cuda"),))
    mine = _toolkit(tmp_path / "my-cuda")
    monkeypatch.setenv("CUDA_PATH", str(mine))
    assert _build.cuda_home() == str(mine)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    assert _build.cuda_home() == str(tmp_path / "cuda")


def test_no_toolkit_means_no_cuda_build(tmp_path, bare):
    (bare / "nvcc").write_text("#!/bin/sh\n")  # local/bin/nvcc, and no local/include/cuda_runtime.h
    (bare / "nvcc").chmod(0o755)
    assert _build.cuda_home() is None
    assert _build.nvcc_path() == str(bare / "nvcc")  # still named, so the build's error names it
    assert _build.use_cuda_toolkit() is None and "CUDA_HOME" not in os.environ


def test_torchs_extension_build_is_pointed_at_the_toolkit(tmp_path, monkeypatch, bare):
    toolkit = _toolkit(tmp_path / "cuda-13.0")
    monkeypatch.setattr(_build, "DEFAULT_CUDA_HOMES", (str(toolkit),))
    # torch.utils.cpp_extension is imported already here: its guess is the wrapper's folder.
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(bare.parent))
    assert _build.use_cuda_toolkit() == str(toolkit)
    assert os.environ["CUDA_HOME"] == str(toolkit)  # for a torch.utils.cpp_extension imported later
    assert cpp_extension.CUDA_HOME == str(toolkit)
    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch before 2.6: include_paths(cuda=True)
        paths = cpp_extension.include_paths(cuda=True)
    assert str(toolkit / "include") in paths
