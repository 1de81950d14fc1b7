"""One process (world size 1, gloo on the CPU) that hands LLaCAAdamW or LLaCA to DeepSpeed at
ZeRO stages 0 to 3, and does to LLaCAAdamW what DeepSpeed's fp16 optimizers (GPU only) do to
their client, and reports, as JSON on stdout, what each first step did: whether it raised (and
what), and whether anything changed (the weights DeepSpeed holds, our state).

Run by tests/integrations/test_deepspeed.py in a subprocess, so that DeepSpeed's process group and globals
stay out of the test process."""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402
import deepspeed.comm.torch as ds_torch_comm  # noqa: E402

import llaca_optim  # noqa: E402

# DeepSpeed builds a shared-memory all-reduce op (C++, minutes on two cores) when it starts its
# communication backend on the CPU. A single process has nothing to reduce across: gloo alone
# does.
ds_torch_comm.build_shm_op = lambda: None


def make_optimizer(kind: str, params):
    if kind == "LLaCAAdamW":
        return llaca_optim.LLaCAAdamW(params, lr=1e-2)
    return llaca_optim.LLaCA(torch.optim.AdamW(params, lr=1e-2))


def masters(engine, model) -> list[torch.Tensor]:
    """The fp32 weights the optimizer updates: DeepSpeed's partitions in stages 1 to 3, the
    model's parameters in stage 0."""
    zero = engine.optimizer
    for name in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"):
        if hasattr(zero, name):
            return [t.detach().clone() for t in getattr(zero, name)]
    return [p.detach().clone() for p in model.parameters()]


def run(stage: int, kind: str) -> dict:
    torch.manual_seed(stage)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    optimizer = make_optimizer(kind, model.parameters())
    config = {"train_batch_size": 4, "zero_optimization": {"stage": stage},
              "zero_allow_untested_optimizer": True}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    x = torch.randn(4, 8)
    engine.backward(engine(x).pow(2).mean())
    before = masters(engine, model)
    try:
        engine.step()
        error = None
    except RuntimeError as err:
        error = str(err)
    after = masters(engine, model)
    inner = getattr(optimizer, "optimizer", optimizer)
    result = {"stage": stage, "kind": kind, "error": error,
              "state_entries": len(optimizer.state) + (len(inner.state) if inner is not optimizer else 0),
              "masters_unchanged": all(torch.equal(a, b) for a, b in zip(before, after))}
    if error is None:  # the same step without DeepSpeed
        twin_optimizer = make_optimizer(kind, twin.parameters())
        twin(x).pow(2).mean().backward()
        twin_optimizer.step()
        result["equals_plain_step"] = all(
            torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    return result


def fp16_optimizer(kind: str) -> dict:
    """What DeepSpeed's fp16 optimizers (GPU only) do to their client, done here: the fused one
    makes the parameters views of one flat buffer and steps one flat fp32 copy per group; the
    unfused one steps an fp32 copy of each parameter."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = llaca_optim.LLaCAAdamW(model.parameters(), lr=1e-2)
    params = list(model.parameters())
    if kind == "flattened":
        flat = _flatten_dense_tensors([p.detach().clone() for p in params])
        for p, view in zip(params, _unflatten_dense_tensors(flat, params)):
            p.data = view.data
        masters = [flat.clone().float().requires_grad_()]
    else:
        masters = [p.detach().clone().float().requires_grad_() for p in params]
    optimizer.param_groups[0]["params"] = masters
    for p in masters:
        p.grad = torch.randn_like(p)
    try:
        optimizer.step()
        error = None
    except RuntimeError as err:
        error = str(err)
    return {"stage": "fp16", "kind": kind, "error": error, "state_entries": len(optimizer.state)}


def main() -> None:
    deepspeed.init_distributed(dist_backend="gloo")
    results = [run(stage, kind) for stage in (0, 1, 2, 3) for kind in ("LLaCAAdamW", "LLaCA")]
    results += [fp16_optimizer(kind) for kind in ("flattened", "unfused")]
    sys.stdout.write("RESULTS " + json.dumps(results) + "\n")


if __name__ == "__main__":
    main()
