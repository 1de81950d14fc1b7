"""Everything a benchmark run times, behind one interface: build on a list of parameters, step.

Baselines (docs/spec.md section 5):

* ``AdamW(fused)``: ``torch.optim.AdamW(fused=True)`` alone, the speed users have today.
* ``AdamW(fused) + published loop``: the per-tensor Python loop of the authors' released code after
  the AdamW step (host sync per tensor included). It is transcribed as a baseline from the
  description of that code in docs/spec.md section 1 (about ten kernels, a gradient copy and a
  ``float(alpha)`` per tensor, EMA in the parameter's dtype).
* ``AdamW(fused) + foreach``: the best sync-free composition of ``torch._foreach_*`` ops we could
  write: the drift ``p - ema`` once (reused for the blend), three ``_foreach_norm(·, 1)``
  reductions, the alphas on the device, then ``_foreach_mul_``, ``_foreach_add_`` and
  ``_foreach_copy_``; fp32 EMA like ours.
* ``copy``: a device-to-device copy moving as many bytes as the LLaCA bytes model, the ceiling.

Ours: ``LLaCAAdamW(backend=...)`` (one fused AdamW+LLaCA op) and ``LLaCA(AdamW(fused=True))``
(torch's step, then our standalone update) for every backend available on the device; also
``LLaCAAdamW`` over the same tensors as one-rank DTensors (the sharded path of FSDP2: kernels in
their sums-out mode, an all-reduce, the alphas from the sums), with ``horizon=100`` (the same
finish without the all-reduce) and with ``defer_blend=False``.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import llaca_optim

SCALE, BASE_WEIGHT = 2.0, 0.01  # the "coin" preset, what the released code uses


class Stepper:
    """One built contender: ``step()`` is what gets timed."""

    def step(self) -> None:
        raise NotImplementedError

    def state_tensors(self) -> list[Tensor]:
        return []


class GraphReplay(Stepper):
    """Another stepper's step captured once in a CUDA graph and replayed: what a training loop
    that captures its whole step pays (no Python, no launch overhead). Three eager steps first,
    on a side stream, as torch.cuda.graphs asks (they also create the optimizer state)."""

    WARMUP = 3

    def __init__(self, inner: Stepper) -> None:
        self.inner = inner
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                inner.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            inner.step()

    def step(self) -> None:
        self.graph.replay()

    def state_tensors(self) -> list[Tensor]:
        return self.inner.state_tensors()


class OptimizerStepper(Stepper):
    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()

    def state_tensors(self) -> list[Tensor]:
        out = []
        opt = getattr(self.optimizer, "optimizer", None)  # the wrapper's inner optimizer too
        for o in (self.optimizer, opt) if opt is not None else (self.optimizer,):
            for st in o.state.values():
                out += [v for v in st.values() if isinstance(v, Tensor)]
        return out


def one_rank_mesh(device: torch.device):
    """A one-rank device mesh (gloo on the CPU, NCCL on a GPU), the process group made on first
    use: enough to run the sharded path of NOTE [sharded parameters] in one process."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if os.path.exists("/sys/class/net/lo"):  # one rank: loopback is all gloo needs
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        atexit.register(dist.destroy_process_group)
    return init_device_mesh(device.type, (1,))


def as_one_rank_dtensors(params: list[Tensor]) -> list[Tensor]:
    """The same parameters and gradients (the same memory) as DTensors sharded over one rank, as
    FSDP2 hands them to an optimizer: the sharded path's cost with no communication in it."""
    from torch.distributed.tensor import DTensor, Shard

    mesh = one_rank_mesh(params[0].device)
    out = []
    for p in params:
        d = torch.nn.Parameter(DTensor.from_local(p.detach(), mesh, [Shard(0)], run_check=False))
        d.grad = DTensor.from_local(p.grad, mesh, [Shard(0)], run_check=False)
        out.append(d)
    return out


class PublishedLoop(Stepper):
    """AdamW(fused) then the published per-tensor LLaCA update, as a Python loop with host syncs."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.inner = torch.optim.AdamW(params, fused=True)
        self.ema: dict[int, Tensor] = {}
        self.last_grad: dict[int, Tensor] = {}

    def step(self) -> None:
        self.inner.step()
        with torch.no_grad():
            for i, p in enumerate(self.params):
                if p.grad is None:
                    continue
                grad = p.grad.detach().clone()
                if i not in self.ema:
                    self.ema[i] = p.detach().clone()
                if i in self.last_grad:
                    distance = torch.sum(torch.abs(p.detach() - self.ema[i]))
                    grad_norm = torch.sum(torch.abs(grad))
                    grad_change = torch.sum(torch.abs(grad - self.last_grad[i]))
                    alpha = float(SCALE * (1 + grad_norm) / (distance * grad_change))  # host sync
                    if not 0 < alpha < 1:
                        alpha = BASE_WEIGHT
                else:
                    alpha = BASE_WEIGHT
                self.ema[i] = (1 - alpha) * self.ema[i] + alpha * p.detach()
                self.last_grad[i] = grad

    def state_tensors(self) -> list[Tensor]:
        inner = [v for st in self.inner.state.values() for v in st.values() if isinstance(v, Tensor)]
        return inner + list(self.ema.values()) + list(self.last_grad.values())


class ForeachComposition(Stepper):
    """AdamW(fused) then the LLaCA update as sync-free ``torch._foreach_*`` calls."""

    def __init__(self, params: list[Tensor]) -> None:
        self.params = params
        self.inner = torch.optim.AdamW(params, fused=True)
        ema_dtype = lambda p: torch.float32 if p.dtype in (torch.bfloat16, torch.float16) else p.dtype  # noqa: E731
        with torch.no_grad():
            self.emas = [p.detach().to(ema_dtype(p), copy=True) for p in params]
        self.prev = [torch.zeros_like(p) for p in params]
        self.has_prev = torch.zeros(len(params), dtype=torch.bool, device=params[0].device)

    def step(self) -> None:
        self.inner.step()
        with torch.no_grad():
            grads = [p.grad for p in self.params]
            drift = torch._foreach_sub(self.params, self.emas)  # fp32 for 16-bit params
            distance = torch.stack(torch._foreach_norm(drift, 1, dtype=torch.float32))
            grad_norm = torch.stack(torch._foreach_norm(grads, 1, dtype=torch.float32))
            grad_change = torch.stack(torch._foreach_norm(torch._foreach_sub(grads, self.prev), 1,
                                                          dtype=torch.float32))
            alpha = SCALE * (1 + grad_norm) / (distance * grad_change)
            alpha = torch.where(self.has_prev & (alpha > 0) & (alpha < 1), alpha, BASE_WEIGHT)
            torch._foreach_mul_(drift, list(alpha.unbind()))  # ema += alpha * (p - ema)
            torch._foreach_add_(self.emas, drift)
            torch._foreach_copy_(self.prev, grads)
            self.has_prev.fill_(True)

    def state_tensors(self) -> list[Tensor]:
        inner = [v for st in self.inner.state.values() for v in st.values() if isinstance(v, Tensor)]
        return inner + self.emas + self.prev


class DeviceCopy(Stepper):
    """Copies ``nbytes / 2`` bytes from one buffer to another: ``nbytes`` of traffic."""

    def __init__(self, nbytes: int, device: torch.device) -> None:
        half = max(1, nbytes // 2)
        self.src = torch.empty(half, dtype=torch.uint8, device=device).fill_(1)
        self.dst = torch.empty_like(self.src)

    def step(self) -> None:
        self.dst.copy_(self.src)


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str      # "baseline" or "ours"
    backend: str   # our backend, or "torch"
    bytes_model: str  # "adamw" (7 accesses), "llaca" (11 accesses), "copy" (bytes moved)
    build: Callable[[list[Tensor]], Stepper]


ADAMW_FUSED = "AdamW(fused)"
PUBLISHED = "AdamW(fused) + published loop"
FOREACH = "AdamW(fused) + foreach"
COPY = "copy"


def contenders(device: torch.device, model_bytes: int, include_published: bool = True,
               backends: list[str] | None = None) -> list[Contender]:
    """The rows of one measurement, baselines first."""
    out = [
        Contender(ADAMW_FUSED, "baseline", "torch", "adamw",
                  lambda ps: OptimizerStepper(torch.optim.AdamW(ps, fused=True))),
        Contender(FOREACH, "baseline", "torch", "llaca", ForeachComposition),
        Contender(COPY, "baseline", "torch", "copy", lambda ps: DeviceCopy(model_bytes, device)),
    ]
    if include_published:
        out.insert(1, Contender(PUBLISHED, "baseline", "torch", "llaca", PublishedLoop))
    for b in backends if backends is not None else llaca_optim.available_backends(device):
        out.append(Contender(f"LLaCAAdamW[{b}]", "ours", b, "llaca",
                             lambda ps, b=b: OptimizerStepper(llaca_optim.LLaCAAdamW(ps, backend=b))))
        out.append(Contender(f"LLaCA(AdamW(fused))[{b}]", "ours", b, "llaca",
                             lambda ps, b=b: OptimizerStepper(
                                 llaca_optim.LLaCA(torch.optim.AdamW(ps, fused=True), backend=b))))
        if device.type == "cuda" and b in ("cuda", "triton"):  # docs/spec.md section 5: lora_llama graph-replayed
            out.append(Contender(f"LLaCAAdamW[{b}] graph", "ours", b, "llaca",
                                 lambda ps, b=b: GraphReplay(OptimizerStepper(
                                     llaca_optim.LLaCAAdamW(ps, backend=b)))))
        if b != "reference" and torch.distributed.is_available():
            out.append(Contender(f"LLaCAAdamW[{b}] sharded (1 rank)", "ours", b, "llaca",
                                 lambda ps, b=b: OptimizerStepper(llaca_optim.LLaCAAdamW(
                                     as_one_rank_dtensors(ps), backend=b))))
        if b != "reference":
            # horizon=H: the kernels' sums, the alpha op, the blend deferred (NOTE [horizon]).
            out.append(Contender(f"LLaCAAdamW[{b}] horizon=100", "ours", b, "llaca",
                                 lambda ps, b=b: OptimizerStepper(
                                     llaca_optim.LLaCAAdamW(ps, backend=b, horizon=100))))
        if b in ("cuda", "cpu"):
            # The two-phase design (blend in the step: 13 accesses for tensors too large to
            # finish in one visit), to show what the deferred blend (the default) gains.
            out.append(Contender(f"LLaCAAdamW[{b}] defer_blend=False", "ours", b, "llaca",
                                 lambda ps, b=b: OptimizerStepper(
                                     llaca_optim.LLaCAAdamW(ps, backend=b, defer_blend=False))))
    if device.type == "cuda":
        out.insert(1, Contender(f"{ADAMW_FUSED} graph", "baseline", "torch", "adamw",
                                lambda ps: GraphReplay(OptimizerStepper(
                                    torch.optim.AdamW(ps, fused=True, capturable=True)))))
    return out


def model_bytes(kind: str, params: list[Tensor]) -> int:
    """docs/spec.md section 5's bytes model for one step over ``params``.

    AdamW reads p, g, m, v and writes p, m, v (7 accesses of the parameter's dtype); the LLaCA step
    adds reading and writing the EMA and the previous gradient (11 accesses). The EMA of a 16-bit
    parameter is fp32 (our default), so its two accesses count 4 bytes each.
    """
    total = 0
    for p in params:
        size, n = p.element_size(), p.numel()
        if kind == "adamw":
            total += 7 * size * n
        else:
            ema_size = 4 if p.dtype in (torch.bfloat16, torch.float16) else size
            total += (9 * size + 2 * ema_size) * n
    return total
