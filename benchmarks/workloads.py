"""The parameter sets of docs/spec.md section 5, sized to the device they run on.

* ``lora_llama``: LoRA r=8 A/B factors on q, k, v, o, gate, up, down of a LLaMA-7B-shaped model
  (hidden 4096, intermediate 11008): 14 tensors and 624,640 parameters per layer; 32 layers on a
  GPU (448 tensors, 20M parameters), 8 on a CPU.
* ``full``: square 4096x4096 matrices on a GPU (64 of them, 1.07B parameters), 2048x2048 on a CPU.
* ``many_tiny``: thousands of 1024-element tensors, where launch and per-tensor costs dominate.

The sweeps behind the plots vary one thing at a time: the number of 1024-element tensors
(10 to 10,000) and the size of a single tensor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HIDDEN, INTERMEDIATE, LORA_RANK = 4096, 11008, 8


@dataclass(frozen=True)
class Workload:
    name: str
    shapes: tuple[tuple[int, ...], ...]
    family: str = ""  # the workload kind (lora_llama, full, many_tiny, tensors_sweep, size_sweep)

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def make_params(self, dtype: torch.dtype, device: torch.device | str, seed: int = 0
                    ) -> list[torch.nn.Parameter]:
        """Parameters with gradients, both N(0, 0.02^2) like a freshly initialised LoRA model.
        Drawn on the device itself: 2B normal samples for ``full`` take tens of seconds on the
        host, time a GPU lease does not have."""
        device = torch.device(device)
        gen = torch.Generator(device=device).manual_seed(seed)

        def draw(shape):
            return (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)

        params = []
        for shape in self.shapes:
            p = torch.nn.Parameter(draw(shape))
            p.grad = draw(shape)
            params.append(p)
        return params


def lora_llama(layers: int, rank: int = LORA_RANK) -> Workload:
    projections = [(HIDDEN, HIDDEN)] * 4 + [(HIDDEN, INTERMEDIATE)] * 2 + [(INTERMEDIATE, HIDDEN)]
    shapes = []
    for _ in range(layers):
        for fan_in, fan_out in projections:
            shapes += [(rank, fan_in), (fan_out, rank)]  # lora_A, lora_B
    return Workload(f"lora_llama[{layers} layers]", tuple(shapes), "lora_llama")


def full(tensors: int, side: int) -> Workload:
    return Workload(f"full[{tensors}x{side}x{side}]", ((side, side),) * tensors, "full")


def many_tiny(tensors: int, size: int = 1024, family: str = "many_tiny") -> Workload:
    return Workload(f"many_tiny[{tensors}x{size}]", ((size,),) * tensors, family)


def single(numel: int) -> Workload:
    return Workload(f"single[{numel}]", ((numel,),), "size_sweep")


def main_workloads(device_type: str, quick: bool = False) -> list[Workload]:
    """The three workloads of docs/spec.md section 5 at the size for this device."""
    if quick:  # the CI-sized run: checks that everything runs, measures nothing worth reporting
        return [lora_llama(1), full(2, 256), many_tiny(50)]
    if device_type == "cuda":
        return [lora_llama(32), full(64, 4096), many_tiny(2000)]
    return [lora_llama(8), full(4, 2048), many_tiny(2000)]


def sweeps(device_type: str, quick: bool = False) -> dict[str, list[Workload]]:
    """Workload series for the plots: time against the number of tensors and against size."""
    if quick:
        counts, sizes = [10, 40], [2**12, 2**14]
    elif device_type == "cuda":
        counts, sizes = [10, 30, 100, 300, 1000, 3000, 10000], [2**k for k in range(16, 30, 2)]
    else:
        counts, sizes = [10, 30, 100, 300, 1000, 3000, 10000], [2**k for k in range(12, 25, 2)]
    return {
        "tensors_sweep": [many_tiny(n, family="tensors_sweep") for n in counts],
        "size_sweep": [single(n) for n in sizes],
    }
