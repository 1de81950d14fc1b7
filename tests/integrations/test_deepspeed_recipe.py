"""The Hugging Face Trainer + DeepSpeed recipe of docs/integrations.md, run as written (taken out
of the docs' text) on two CPU ranks: ZeRO 2 in fp32 and ZeRO 3 in bf16. It trains, ends the task
through LLaCACallback, exports the EMA from its on_task_end hook, saves the model, and reads the
EMA back from the Trainer's checkpoint files, bit for bit."""

from __future__ import annotations

import importlib.util
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from llaca_optim import _build

# Two DeepSpeed launches of a Trainer: .ci/run runs them after the README's command.
pytestmark = [pytest.mark.extended, pytest.mark.slow]

if importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("transformers") is None:
    if os.environ.get("LLACA_REQUIRE_NATIVE") == "1":
        raise ImportError("deepspeed or transformers is not installed; pip install -e '.[test]'")
    pytest.skip("deepspeed and transformers are needed", allow_module_level=True)

DOCS = _build.PACKAGE_DIR.parent / "docs" / "integrations.md"
LAUNCHER = Path(__file__).with_name("_run_recipe.py")


def recipe(name: str) -> str:
    text = DOCS.read_text()
    found = re.search(rf"<!-- runnable: {re.escape(name)} -->\s*```python\n(.*?)```", text, re.S)
    assert found, f"docs/integrations.md has no runnable block {name}"
    return found.group(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("stage, bf16", [(2, False), (3, True)], ids=["zero2-fp32", "zero3-bf16"])
def test_the_trainer_recipe_runs_as_written(tmp_path, stage, bf16):
    script = tmp_path / "deepspeed_trainer.py"
    script.write_text(recipe("deepspeed_trainer.py"))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "ZERO_STAGE": str(stage), "BF16": "1" if bf16 else "0"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(LAUNCHER), str(script)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    found = re.search(r"(\d+) EMA tensors; the checkpoint files' EMA against the gathered one: ([0-9.eE+-]+)",
                      run.stdout)
    assert found, run.stdout[-3000:]
    assert int(found.group(1)) > 10 and float(found.group(2)) == 0.0
    saved = {p.name for p in (tmp_path / "ds-out").iterdir()}
    assert saved & {"model.safetensors", "pytorch_model.bin"}, saved
