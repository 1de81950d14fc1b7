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


# ---------------------------------------------------------------- the demo's command line

def _entry_point(name: str):
    from importlib.metadata import entry_points

    return next(ep for ep in entry_points(group="console_scripts") if ep.name == name)


def test_the_demo_command_exits_0_after_a_run():
    """``llaca-optim-demo`` is ``sys.exit(main())``, as pip's console scripts are: main must
    return 0 (a list would exit 1)."""
    pytest.importorskip("sklearn")
    ep = _entry_point("llaca-optim-demo")
    script = ("import sys; from importlib.metadata import entry_points\n"
              f"ep = next(e for e in entry_points(group='console_scripts') if e.name == {ep.name!r})\n"
              "sys.argv = ['llaca-optim-demo', '--tasks', '3', '--steps', '2', '--width', '8']\n"
              "sys.exit(ep.load()())\n")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Forgetting" in run.stdout
    assert cli.main(["demo", "--tasks", "3", "--steps", "1", "--width", "4"]) == 0


@pytest.mark.parametrize("args, flag", [
    (["--steps", "0"], "--steps"), (["--steps", "-3"], "--steps"), (["--batch", "0"], "--batch"),
    (["--width", "0"], "--width"), (["--lr", "0"], "--lr"), (["--lr", "nan"], "--lr"),
    (["--seed", "-1"], "--seed"), (["--backend", "bogus"], "--backend"), (["--tasks", "2"], "--tasks"),
])
def test_bad_demo_arguments_are_usage_errors_before_any_work(monkeypatch, capsys, args, flag):
    from llaca_optim import demo

    def no_work(*_, **__):
        raise AssertionError("the demo started work before checking its arguments")

    monkeypatch.setattr(demo, "load_tasks", no_work)
    monkeypatch.setattr(demo, "run_method", no_work)
    with pytest.raises(SystemExit) as exited:
        cli.main(["demo", *args])
    assert exited.value.code == 2
    assert flag in capsys.readouterr().err


# ---------------------------------------------------------------- the benchmark's command line

def _committed_results():
    from llaca_optim import _build

    root = _build.PACKAGE_DIR.parent / "benchmarks" / "results"
    return {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in root.rglob("*") if p.is_file()}


def test_bench_without_out_leaves_the_committed_results_alone(tmp_path):
    """``bench --quick`` without ``--out`` writes into bench-results/ of the current folder,
    never into benchmarks/results/ (the committed figures the docs link to), and the profiler's
    native lines do not reach the terminal."""
    pytest.importorskip("matplotlib")
    before = _committed_results()
    run = subprocess.run(
        [sys.executable, "-m", "llaca_optim", "bench", "--quick", "--no-sweeps", "--workloads",
         "lora_llama", "--dtypes", "float32", "--steps", "2", "--device", "cpu"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _committed_results() == before
    written = list((tmp_path / "bench-results").glob("*/results.json"))
    assert len(written) == 1, list(tmp_path.rglob("*"))
    for noise in ("USDT", "profiler_start", "CPUAllocator"):
        assert noise not in run.stderr and noise not in run.stdout


def test_bench_help_names_the_command_it_was_called_by(capsys):
    path = list(sys.path)
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    assert sys.path == path  # the checkout's benchmarks/ is imported by path, sys.path untouched
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m llaca_optim bench")
    assert "bench-results" in out
