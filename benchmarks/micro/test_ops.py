"""One microbenchmark per op and backend, plus torch's fused AdamW step for scale.

The ops are called through the backend interface (llaca_optim.backends), on the buckets the
optimizer would build, so the figures are the kernels' cost without the optimizer's planning:

    pytest benchmarks/ --benchmark-columns=median,iqr,rounds --benchmark-group-by=param:dtype

Sizes: docs/spec.md section 5's ``lora_llama`` with 2 layers (28 tensors, 1.25M parameters) and 500
1024-element tensors (``many_tiny``): big enough to be memory-bound, small enough for a laptop.
"""

from __future__ import annotations

import pytest
import torch

import llaca_optim
from llaca_optim.functional import step_bucket
from llaca_optim.ops.registry import resolve_backend
from llaca_optim.ops.roles import Bucket, StepHyper

from ..workloads import lora_llama, many_tiny

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
WORKLOADS = {"lora_llama2": lora_llama(2), "many_tiny500": many_tiny(500)}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BACKENDS = llaca_optim.available_backends(DEVICE)


def make_bucket(workload, dtype, with_adamw: bool) -> Bucket:
    params = workload.make_params(dtype, DEVICE)
    ema_dtype = torch.float32 if dtype != torch.float32 else dtype
    b = Bucket(params=[p.detach() for p in params], grads=[p.grad for p in params])
    if with_adamw:
        b.exp_avgs = [torch.zeros_like(p) for p in params]
        b.exp_avg_sqs = [torch.zeros_like(p) for p in params]
        b.state_steps = [torch.zeros((), device=DEVICE) for _ in params]
    b.emas = [p.detach().to(ema_dtype, copy=True) for p in params]
    b.prev_grads = [torch.randn_like(p) for p in params]
    b.alphas = [torch.full((), 0.5, device=DEVICE) for _ in params]  # not fresh: full LLaCA path
    b.alpha_fell_backs = [torch.zeros((), dtype=torch.bool, device=DEVICE) for _ in params]
    return b


def run(benchmark, fn):
    if DEVICE == "cuda":
        def fn_synced():
            fn()
            torch.cuda.synchronize()
        benchmark(fn_synced)
    else:
        benchmark(fn)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["adamw_llaca_", "llaca_update_"])
def test_op(benchmark, op, backend, workload, dtype):
    fused = op == "adamw_llaca_"
    bucket = make_bucket(WORKLOADS[workload], DTYPES[dtype], with_adamw=fused)
    impl, hyper = resolve_backend(backend, DEVICE), StepHyper()
    benchmark.extra_info.update(op=op, backend=backend, tensors=len(bucket.params))
    run(benchmark, lambda: step_bucket(impl, bucket, hyper, op))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_torch_adamw_fused_step(benchmark, workload, dtype):
    params = WORKLOADS[workload].make_params(DTYPES[dtype], DEVICE)
    optimizer = torch.optim.AdamW(params, fused=True)
    benchmark.extra_info.update(op="torch AdamW(fused=True).step", tensors=len(params))
    run(benchmark, optimizer.step)
