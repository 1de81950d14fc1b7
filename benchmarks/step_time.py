"""A first step-time measurement: LLaCAAdamW against torch's fused AdamW on the same threads.

    python -m benchmarks.step_time [--layers 8] [--dtype float32] [--repeats 50]

Workload: SPEC's `lora_llama` (LoRA r=8 A/B pairs on q, k, v, o, gate, up, down of a
4096/11008 LLaMA shape), with fewer layers on a CPU. Prints the median step time of each
optimizer and the ratio to fused AdamW measured in the same run. The full benchmark suite
(baselines, bytes model, plots) is an open issue.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import llaca_optim


def lora_llama(layers: int, dtype: torch.dtype, rank: int = 8) -> list[torch.Tensor]:
    hidden, intermediate = 4096, 11008
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in [(hidden, hidden)] * 4 + [(hidden, intermediate)] * 2 + [(intermediate, hidden)]:
            shapes += [(rank, fan_in), (fan_out, rank)]
    return [torch.nn.Parameter(torch.randn(s, dtype=dtype) * 0.02) for s in shapes]


def median_step_ms(make, params, repeats: int, warmup: int = 5) -> float:
    for p in params:
        p.grad = torch.randn_like(p)
    optimizer = make(params)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    params = lora_llama(args.layers, dtype)
    n = sum(p.numel() for p in params)
    rows = [
        ("torch AdamW(fused=True)", lambda ps: torch.optim.AdamW(ps, fused=True)),
        ("LLaCAAdamW cpu, llaca=False", lambda ps: llaca_optim.LLaCAAdamW(ps, llaca=False, backend="cpu")),
        ("LLaCAAdamW cpu", lambda ps: llaca_optim.LLaCAAdamW(ps, backend="cpu")),
        ("LLaCAAdamW reference", lambda ps: llaca_optim.LLaCAAdamW(ps, backend="reference")),
    ]
    print(f"lora_llama, {args.layers} layers: {len(params)} tensors, {n:,} parameters, {args.dtype}, "
          f"{torch.get_num_threads()} threads")
    baseline = None
    for name, make in rows:
        ms = median_step_ms(make, params, args.repeats)
        baseline = baseline or ms
        print(f"  {name:<30} {ms:9.3f} ms   {ms / baseline:5.2f}x fused AdamW")


if __name__ == "__main__":
    main()
