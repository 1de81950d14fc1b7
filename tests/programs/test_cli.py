"""``python -m llaca_optim``: ``info`` reports every backend and the toolchain, the other
commands forward their arguments, bad use says how to use it."""

from __future__ import annotations

import subprocess
import sys

import pytest

import llaca_optim
from llaca_optim import cli


def test_info_in_a_fresh_process_names_every_backend():
    run = subprocess.run([sys.executable, "-m", "llaca_optim", "info"], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert f"llaca_optim: {llaca_optim.__version__}" in out
    for name, (ok, _) in llaca_optim.backend_status().items():
        assert any(line.split()[:2] == [name, "yes" if ok else "no"] for line in out.splitlines()), \
            f"no line for the {name} backend:\n{out}"
    for key in ("torch:", "triton:", "C++ compiler:", "CUDA toolkit:", "threads:",
                "first-use build cache:", "backend='auto' on cpu tensors:"):
        assert key in out


def test_the_version_is_written_once():
    from llaca_optim._version import __version__

    assert llaca_optim.__version__ == __version__
    from importlib.metadata import version

    assert version("llaca_optim") == __version__  # pyproject.toml reads it from _version.py


def test_demo_and_bench_get_their_arguments(capsys):
    with pytest.raises(SystemExit) as demo_help:
        cli.main(["demo", "--help"])
    assert demo_help.value.code == 0
    assert "python -m llaca_optim demo" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bench_help:
        cli.main(["bench", "--help"])
    assert bench_help.value.code == 0
    assert "--workloads" in capsys.readouterr().out


def test_usage_errors(capsys):
    assert cli.main([]) == 2
    assert "info" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["nope"])
    with pytest.raises(SystemExit):
        cli.main(["info", "--extra"])
