"""Multi-step trajectories on a fixed zoo of awkward tensors, shared by the parity tests.

A trajectory builds fresh parameters from the same random base values, feeds every optimizer the
same random gradients for `steps` steps, and returns every parameter and every state tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from llaca_optim.ops.roles import LLACA_STATE_KEYS, SAVED_STATE_KEYS

# Every state entry of the role table that a state dict holds, so that a new role is compared as
# soon as it is a row there.
STATE_KEYS = SAVED_STATE_KEYS


def tensor_zoo(dtype: torch.dtype, large: bool = True,
               many_chunks: bool = True) -> list[Callable[[], Tensor]]:
    """Makers of fresh parameter tensors with the same values each call: empty, one element, two
    small ones (one chunk of the emulated CUDA kernels: finished in registers), an odd size, several CPU sum blocks (one work item), one past the CPU kernel's whole-tensor limit
    (2^18 elements: split over threads, alpha and blend in later passes), a transposed (dense,
    non-contiguous) tensor and a strided view with gaps (which the fused kernels decline and the
    reference updates in place)."""
    shapes = {"empty": (0, 3), "one": (1,), "small": (7, 33), "chunk": (256,), "odd": (4097,),
              "multi_chunk": (70001,),
              "split": (2**18 + 4099,), "matrix": (37, 65)}
    base = {name: torch.randn(shape) for name, shape in shapes.items()}
    strided_base = torch.randn(40, 64)
    # large=False leaves out the tensor past the CPU kernel's limit, many_chunks=False the
    # 70001-element one (18 of the CUDA kernels' chunks): kernels emulated on a CPU (Triton's
    # interpreter, the CUDA emulation) run every block in turn and need seconds for them
    # (tests/support/parity.py says which leaves out what).
    return [
        lambda: base["empty"].to(dtype, copy=True),
        lambda: base["one"].to(dtype, copy=True),
        lambda: base["small"].to(dtype, copy=True),   # one chunk of the emulated CUDA kernels,
        lambda: base["chunk"].to(dtype, copy=True),   # finished on chip, and exactly one chunk
        lambda: base["odd"].to(dtype, copy=True),
        *([lambda: base["multi_chunk"].to(dtype, copy=True)] if many_chunks else []),
        *([lambda: base["split"].to(dtype, copy=True)] if large else []),
        lambda: base["matrix"].to(dtype, copy=True).t(),             # strides (1, 37): dense, not contiguous
        lambda: strided_base.to(dtype, copy=True)[:, ::2],           # every other column: not dense
    ]


def gradient_sequence(makers: list[Callable[[], Tensor]], steps: int, nonfinite_at: int | None = None):
    """Random gradients of each parameter's shape and layout, with a varying scale so that the
    gradient change (and thus alpha) moves from step to step."""
    sequence = []
    for step in range(steps):
        grads = []
        for make in makers:
            like = make()
            g = torch.empty_like(like, dtype=torch.float32).normal_() * (0.3 + 1.7 * torch.rand(()))
            g = g.to(like.dtype)
            if nonfinite_at == step and g.numel() > 1:
                g[(0,) * g.dim()] = float("inf")
                g[tuple(size - 1 for size in g.shape)] = float("nan")
            grads.append(g)
        sequence.append(grads)
    return sequence


def run_trajectory(make_optimizer, makers, grad_sequence, *, after_step=None, device="cpu"
                   ) -> dict[str, list[Tensor]]:
    # On another device the strided view with gaps arrives dense (.to() packs it): there it tests
    # one layout less.
    params = [nn.Parameter(make() if device == "cpu" else make().to(device)) for make in makers]
    optimizer = make_optimizer(params)
    for step, grads in enumerate(grad_sequence):
        for p, g in zip(params, grads):
            p.grad = g.to(device).clone()  # clone keeps the layout that gradient_sequence gave it
        optimizer.step()
        if after_step is not None:
            optimizer = after_step(step, optimizer, params) or optimizer
    return collect(optimizer, params)


def collect(optimizer, params) -> dict[str, list[Tensor]]:
    """Every parameter and state tensor, read from ``optimizer.state`` after the documented
    ``flush_ema()`` (a deferring backend's EMAs lag one blend behind until then)."""
    if hasattr(optimizer, "flush_ema"):
        optimizer.flush_ema()
    out: dict[str, list[Tensor]] = {"param": [p.detach().cpu().clone() for p in params]}
    llaca_state = optimizer.state
    inner_state = getattr(optimizer, "optimizer", optimizer).state
    for key in STATE_KEYS:
        values = []
        for p in params:
            state = (llaca_state if key in LLACA_STATE_KEYS else inner_state).get(p, {})
            if key in state:  # torch.as_tensor: some inner optimizers count steps in ints
                values.append(torch.as_tensor(state[key]).detach().cpu().clone())
        if values:
            out[key] = values
    return out
