"""DeepSpeed ZeRO hands the optimizer flat partitions cut across parameter tensors; LLaCA's
alpha is per tensor, so LLaCAAdamW and LLaCA refuse a step over them (llaca_optim/integrations/deepspeed.py)
with a message that says what is supported, changing nothing. Stage 0 (no partitioning) steps
the model's own parameters and gives the plain step's bits.

DeepSpeed runs in a subprocess (tests/integrations/_deepspeed_worker.py): one rank, gloo on the CPU."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# Imported in the worker only: importing it here would leave it loaded for every later test.
if importlib.util.find_spec("deepspeed") is None:
    if os.environ.get("LLACA_REQUIRE_NATIVE") == "1":  # CI installs the test extras: run it there
        raise ImportError("deepspeed is not installed; pip install -e '.[test]' installs it")
    pytest.skip("deepspeed is not installed", allow_module_level=True)

WORKER = Path(__file__).with_name("_deepspeed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True,
                         timeout=600)
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULTS ")), None)
    assert run.returncode == 0 and line, f"worker failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    return {(r["stage"], r["kind"]): r for r in json.loads(line[len("RESULTS "):])}


@pytest.mark.parametrize("kind", ["LLaCAAdamW", "LLaCA"])
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_partitions_are_refused_and_nothing_changes(results, stage, kind):
    r = results[(stage, kind)]
    assert r["error"] is not None, "the step over flat partitions ran"
    assert r["error"].startswith(f"llaca_optim: {kind} is being stepped by DeepSpeed ZeRO stage")
    assert "fully_shard" in r["error"] and "stage 0" in r["error"]
    assert r["state_entries"] == 0 and r["masters_unchanged"]


@pytest.mark.parametrize("kind", ["LLaCAAdamW", "LLaCA"])
def test_stage_0_steps_as_without_deepspeed(results, kind):
    r = results[(0, kind)]
    assert r["error"] is None and r["state_entries"] > 0 and r["equals_plain_step"]



@pytest.mark.parametrize("flattened", [True, False])
def test_flattened_groups_of_the_fp16_optimizer_are_refused(results, flattened):
    """DeepSpeed's fused fp16 optimizer (GPU only) makes the model's parameters views of one flat
    buffer and hands the optimizer one flat fp32 copy per group: refused. Its unfused one hands
    an fp32 copy of each parameter, on which per-tensor LLaCA is right: stepped. Done in the
    worker as those optimizers do it to their client, without a GPU."""
    r = results[("fp16", "flattened" if flattened else "unfused")]
    if flattened:
        assert r["error"] is not None and "DeepSpeed fp16 optimizer" in r["error"]
        assert r["state_entries"] == 0
    else:
        assert r["error"] is None and r["state_entries"] == 4
