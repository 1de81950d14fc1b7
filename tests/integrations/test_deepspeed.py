"""DeepSpeed ZeRO hands the optimizer flat partitions cut across parameter tensors; LLaCAAdamW and
LLaCA map them back to the tensors (NOTE [ZeRO partitions] in llaca_optim/optim/zero.py)
and compute each tensor's alpha from its whole-tensor sums.

Two ranks (gloo on the CPU) run tests/integrations/_deepspeed_worker.py once, in a subprocess,
and report as JSON: every case trains 24 steps against an unsharded twin on the same global
batches, with tensors cut across the ranks and a rank holding no piece of a tensor or of a whole
partition."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

# This module's marks (what each means: tests/conftest.py).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("test_deepspeed")]

# Imported in the worker only: importing it here would leave it loaded for every later test.
if importlib.util.find_spec("deepspeed") is None:
    if os.environ.get("LLACA_REQUIRE_NATIVE") == "1":  # CI installs the test extras: run it there
        raise ImportError("deepspeed is not installed; pip install -e '.[test]' installs it")
    pytest.skip("deepspeed is not installed", allow_module_level=True)

WORKER = Path(__file__).with_name("_deepspeed_worker.py")
ZERO_CASES = ["LLaCAAdamW/stage1", "LLaCAAdamW/stage2", "LLaCAAdamW/stage3", "LLaCA/stage2",
              "LLaCAAdamW/stage2/bf16", "LLaCAAdamW/stage3/bf16",
              "LLaCAAdamW/stage1/reference",  # the reference kernels on the pieces
              "LLaCAAdamW/stage2/offload", "LLaCAAdamW/stage3/offload",
              # the mean norms: each row's sums divided by its whole tensor's size
              "LLaCAAdamW/stage2/mean", "LLaCAAdamW/stage3/mean",
              # horizon=H: the calibrated alphas from each row's whole-tensor sums
              "LLaCAAdamW/stage2/horizon", "LLaCA/stage3/bf16/horizon"]
# fp32 rounding: the ranks' gradients are averaged in another order than one process sums them.
ROUNDING = 2e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results():
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(WORKER)],
        env=env, capture_output=True, text=True, timeout=900)
    lines = [l for l in run.stdout.splitlines() if l.startswith("RESULTS ")]
    assert run.returncode == 0 and len(lines) == 2, \
        f"worker failed:\n{run.stdout[-4000:]}\n{run.stderr[-6000:]}"
    return {(r["case"], r["rank"]): r for line in lines for r in json.loads(line[len("RESULTS "):])}


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ZERO_CASES)
def test_zero_matches_the_unsharded_run(results, case, rank):
    """Parameters, moments, previous gradients and EMAs to fp32 rounding of the unsharded twin
    after 24 steps, the alphas at every step likewise (adaptive ones among them, not only the
    fallback) and the fallback flags equal. In bf16 the twin steps the same gradients, so the
    state is bit for bit the twin's."""
    r = results[(case, rank)]
    diffs = r["diffs"]
    assert diffs["adaptive_alphas"] > 50 and diffs["fell_back_mismatches"] == 0
    assert r["alphas_per_step"] == 5, "an alpha per original tensor, on every rank"
    for key in ("param", "exp_avg", "exp_avg_sq", "prev_grad", "ema", "alpha"):
        assert diffs[key] < ROUNDING, (key, diffs[key])
    if "/bf16" in case:
        assert all(diffs[key] == 0.0 for key in ("param", "exp_avg", "exp_avg_sq", "prev_grad")), diffs


@pytest.mark.parametrize("case", ZERO_CASES)
def test_partitions_cut_tensors_and_leave_a_rank_without_pieces(results, case):
    """What the cases exercise: tensors straddling the ranks, a rank holding no piece of a
    tensor (stage 3) or of a whole partition (stages 1 and 2), every rank with every row."""
    r0, r1 = results[(case, 0)], results[(case, 1)]
    assert r0["rows"] == r1["rows"] == [4, 1]
    assert r0["straddling"] + r1["straddling"] > 0
    assert 0 in r0["pieces"] + r1["pieces"]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ZERO_CASES)
def test_task_api_under_zero(results, case, rank):
    """ema_weights() puts the EMA into the masters and into the model DeepSpeed runs, and the
    live weights back after; end_task() leaves the model at the twin's EMA weights and drops the
    LLaCA state; DeepSpeed's own view of a parameter's optimizer state finds its EMA."""
    r = results[(case, rank)]
    tolerance = 2e-2 if "/bf16" in case else ROUNDING  # bf16 forward vs an fp32 twin
    ema, end = r["ema_weights"], r["end_task"]
    assert ema["masters_hold_the_ema"] and ema["live_restored"]
    assert ema["ema_vs_twin"] < ROUNDING and end["vs_twin"] < ROUNDING
    assert ema["output_vs_twin"] < tolerance and end["output_vs_twin"] < tolerance
    assert r["live_output_vs_twin"] < tolerance
    assert end["state_cleared"] and r["deepspeed_sees_the_ema"]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ZERO_CASES)
def test_deepspeed_checkpoint_resumes_bit_for_bit(results, case, rank):
    """engine.save_checkpoint at step 12, load_checkpoint into a new engine and optimizer, 12
    more steps: parameters, moments, previous gradients, EMAs and alphas equal, bit for bit, to
    those of the run that went on."""
    assert results[(case, rank)]["resume_bitwise"]


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("case", ZERO_CASES)
def test_ema_weights_from_the_checkpoint_files(results, case, rank):
    """ema_weights_from_zero_checkpoint reads the EMA weights out of the checkpoint files alone
    (zero_to_fp32's consolidation, EMAs in the masters' place): bit for bit what
    ema_state_dict gathered from the ranks when the checkpoint was saved."""
    assert results[(case, rank)]["offline_ema_bitwise"]


@pytest.mark.parametrize("case", [c for c in ZERO_CASES if "offload" not in c])
def test_ema_weights_from_a_relative_folder_and_damaged_files(results, case):
    """engine.save_checkpoint users pass a relative folder: it reads the same EMA weights as the
    absolute one. A rank's file missing or cut short is refused naming the user's file or
    folder, never the temporary copy."""
    found = results[(case, 0)]["offline_files"]
    assert found["relative_bitwise"]
    missing, truncated = found["missing"], found["truncated"]
    assert missing["error"] is not None and missing["folder"] in missing["error"]
    assert "missing" in missing["error"] and "/tmp" not in missing["error"].replace(missing["folder"], "")
    assert truncated["error"] is not None and truncated["file"] in truncated["error"]
    assert "cut short" in truncated["error"]


@pytest.mark.parametrize("rank", [0, 1])
def test_views_of_one_buffer_step_with_deepspeed_merely_imported(results, rank):
    """Importing DeepSpeed is not running it: parameters that are views of one buffer, in a group
    added through the inner optimizer, step as without DeepSpeed (the fp16 optimizer is
    recognised by what it sets, a group's parameters replaced by one flat copy of them all)."""
    r = results[("views_of_one_buffer", rank)]
    assert r["error"] is None and r["bitwise"]


@pytest.mark.parametrize("rank", [0, 1])
def test_stage_0_steps_as_without_deepspeed(results, rank):
    r = results[("LLaCAAdamW/stage0", rank)]
    assert r["state_entries"] == 5 and r["param"] < ROUNDING


@pytest.mark.parametrize("flattened", [True, False])
def test_flattened_groups_of_the_fp16_optimizer_are_refused(results, flattened):
    """DeepSpeed's fused fp16 optimizer (GPU only) makes the model's parameters views of one flat
    buffer and hands the optimizer one flat fp32 copy per group, with no map back to the
    tensors: refused. Its unfused one hands an fp32 copy of each parameter, on which per-tensor
    LLaCA is right: stepped. Done in the worker as those optimizers do it to their client."""
    r = results[("fp16/" + ("flattened" if flattened else "unfused"), 0)]
    if flattened:
        assert r["error"] is not None and "DeepSpeed's fp16 optimizer" in r["error"]
        assert "nothing was changed" in r["error"] and r["state_entries"] == 0
    else:
        assert r["error"] is None and r["state_entries"] == 4


@pytest.mark.parametrize("rank", [0, 1])
def test_trainer_with_a_deepspeed_config(results, rank):
    """The Hugging Face Trainer with ``deepspeed=`` (ZeRO stage 2) builds LLaCAAdamW from
    ``optimizer_cls_and_kwargs``: its partitions are mapped, LLaCACallback logs the alphas and
    ends the task on every rank."""
    r = results[("trainer/stage2", rank)]
    assert r["partitions"] == 2 and r["logged_alphas"] >= 3 and r["state_cleared"]


@pytest.mark.parametrize("case", ["LLaCAAdamW/stage2", "LLaCAAdamW/stage3", "LLaCA/stage2"])
def test_bad_input_under_zero(results, case):
    """optimizer.ema(param) of a partitioned parameter says where its EMA is; a per-tensor slot
    of a ZeRO partition edited to the wrong length is refused at the step, naming the entry and
    the length it needs, before anything changes."""
    r = results[(case, 0)]["bad_input"]
    assert "ema_state_dict(model" in r["ema_of_a_partitioned_param"]
    message = r["short_slot"]
    assert message is not None and "['alpha']" in message and "got 1 elements" in message
    assert "must be a 4-element (one per tensor of its ZeRO partition)" in message
    assert r["nothing_changed"]
