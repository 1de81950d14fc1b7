"""Sharded parameters: DTensors, as FSDP2's ``fully_shard`` and tensor parallelism make them.

NOTE [sharded parameters]
LLaCA's alpha is per *whole* tensor: it needs ``a = sum|p - ema|``, ``b = sum|g|`` and
``c = sum|g - g_prev|`` over every element, while each rank holds only its shard. The published
code has no answer to that (it is incompatible with ZeRO-1 and above). Here a bucket of sharded
parameters runs the fused kernels on the local shards in their sharded mode (``shard_sums`` in
llaca_optim/ops/library.py), then:

1. the kernels do the AdamW step and write each tensor's *local* sums to one float64 row of the
   bucket's ``sums`` tensor; they compute no alpha and blend nothing;
2. one all-reduce of that ``[n, 3]`` tensor per sharded mesh dimension turns them into
   whole-tensor sums (a replicated mesh dimension holds copies, so it is not summed over);
3. the backend's ``llaca_alphas_`` op (its default kernel: ``alphas_from_sums_`` in
   llaca_optim/reference.py) computes every alpha and fallback flag from them, in the same
   float64 arithmetic as the kernels (llaca/math.h), and marks the blends pending;
4. the blend runs at the tensor's next step, which reads p and the EMA anyway (backends that
   defer the blend), or at once through ``llaca_flush_``.

Nothing in this synchronises with the host: the all-reduce is queued on the stream like any
collective, so a step stays capturable. The sums are float64, so only the order in which shards'
float32 block sums are added differs from an unsharded run: with one shard the result is bit
for bit the unsharded one (tested), with several it matches the reference to rounding.

The optimizer state of a DTensor parameter is made of DTensors with the parameter's placements
(``exp_avg``, ``exp_avg_sq``, ``ema``, ``prev_grad``), as ``torch.optim.AdamW`` keeps it, so
``torch.distributed.checkpoint`` saves and reshards it; the per-tensor slots (``step``,
``alpha``, ``alpha_fell_back``) are plain tensors, identical on every rank (a bucket's
``alpha`` and ``alpha_fell_back`` are views of one vector each, see :class:`ShardReduce`).
The reference backend takes DTensors whole (DTensor's own reductions, one host sync per
tensor).

NOTE [horizon]
With ``horizon=H`` a group's alphas come from steps 1-4 above whatever its tensors are (a plain
tensor's bucket has a reduction with nothing to reduce), so the rule is written once, in the
``llaca_alphas_`` op, and holds on every backend, for DTensors and for ZeRO partitions alike.
LLaCA's signal ``r = (1 + b) / (a c)`` has a level that falls with the tensor's size
(docs/coin-recipe.md); each tensor keeps the running mean ``m`` of ``log r`` (state
``signal_log_mean``, with ``signal_count`` the steps it holds: the mean of the task's steps for
the first ``HORIZON_WINDOW`` of them, then an EMA of weight 1 / ``HORIZON_WINDOW``), and

    alpha = min(exp(log r - m) / H, HORIZON_ALPHA_MAX)

whose typical value is 1/H at any size, while a step whose signal is above its recent level
blends more and one below it less. A step whose signal is not finite (``a c = 0``) blends 1/H
and leaves ``m`` as it was. The statistic is state like the EMA: saved, loaded, dropped by
``end_task``. ``benchmarks/continual/horizon.py`` is the prototype the frontiers ran; a test
holds this to it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..functional import step_bucket
from ..ops.registry import is_dtensor
from ..ops.roles import HORIZON_STATE, LLACA_FLUSH


def any_sharded() -> bool:
    """Whether any DTensor can exist in this process (see ops.registry.is_dtensor)."""
    return "torch.distributed.tensor" in sys.modules


def local(t: Tensor) -> Tensor:
    """The shard of ``t`` this rank holds (``t`` itself for a plain tensor): a view of the same
    memory, so the kernels update the DTensor in place."""
    return t._local_tensor if is_dtensor(t) else t  # to_local() without the autograd plumbing


@dataclass(frozen=True)
class ShardLayout:
    """Where a DTensor's elements live: its mesh, its placements, and the mesh dimensions over
    which its shards must be summed. Parameters with equal layouts share one reduction."""

    mesh: Any
    placements: tuple[Any, ...]
    sum_dims: tuple[int, ...]


def layout_of(p: Tensor, companions: list[Tensor]) -> ShardLayout | None:
    """The layout of a DTensor parameter whose gradient and state are laid out alike, so the
    fused kernels can run on the shards; None when they are not (the reference backend then
    takes the DTensors whole) or for a plain tensor."""
    if not is_dtensor(p):
        return None
    for t in companions:
        if not is_dtensor(t) or t.device_mesh != p.device_mesh or t.placements != p.placements:
            return None
    if any(placement.is_partial() for placement in p.placements):
        return None
    sum_dims = tuple(d for d, placement in enumerate(p.placements) if placement.is_shard())
    return ShardLayout(p.device_mesh, tuple(p.placements), sum_dims)


class ShardReduce:
    """The cross-shard part of one bucket's step: its sums tensor and the all-reduce over the
    mesh dimensions its tensors are sharded along, then the alphas from the reduced sums. Every
    buffer is allocated once and reused (a step allocates nothing in proportion to the model).

    The bucket's per-tensor slots (``alpha``, ``alpha_fell_back``, the blend's pending flag and,
    with a horizon, its statistic) are views of one vector per kind held here (``hold_slots``),
    as a ZeRO partition's are (:class:`SegmentReduce`): the alpha op writes each vector where the
    state and the kernels read it, with nothing copied per tensor at a step."""

    def __init__(self, layout: ShardLayout | None, elements: list[int], device: torch.device) -> None:
        """``layout`` None: plain tensors (a horizon group, NOTE [horizon]): nothing to reduce."""
        self.layout = layout
        self.sums = torch.zeros((len(elements), 3), dtype=torch.float64, device=device)
        # Each whole tensor's element count, for the mean norms (norms="mean").
        self.elements = torch.tensor(elements, dtype=torch.float64, device=device)
        none = torch.zeros(0, dtype=torch.float64, device=device)
        self.signal = (none, none)  # the horizon's statistic, when the bucket has one
        self.alpha = self.alpha_fell_back = self.pending = none
        self.flags: list[Tensor] = []  # views of ``pending``: the flags of a bucket that does not defer

    def hold_slots(self, bucket: Any, entries: list[dict[str, Any]], horizon: bool) -> None:
        """Makes the one-element slots of the bucket's tensors (their state ``entries``, in the
        bucket's order) views of one vector per kind, with the values they held; the entries and
        the bucket's lists are given the views. Called when the bucket is planned, after its
        deferral is decided (a bucket that defers keeps its flags in the state; one that does
        not gets flags of its own, cleared by the blend that reads them)."""

        def vector(key: str) -> tuple[Tensor, list[Tensor]]:
            held = torch.stack([entry[key].reshape(()) for entry in entries])  # () or (1,)
            views = list(held.unbind())
            for entry, view in zip(entries, views):
                entry[key] = view
            return held, views

        self.alpha, bucket.alphas = vector("alpha")
        self.alpha_fell_back, bucket.alpha_fell_backs = vector("alpha_fell_back")
        if horizon:
            self.signal = tuple(vector(key)[0] for key in HORIZON_STATE)
        if bucket.ema_pending:
            self.pending, bucket.ema_pending = vector("ema_pending")
        else:
            self.pending = torch.zeros(len(entries), dtype=torch.bool, device=self.sums.device)
            self.flags = list(self.pending.unbind())

    def all_reduce(self) -> None:
        import torch.distributed as dist

        for dim in self.layout.sum_dims if self.layout is not None else ():
            dist.all_reduce(self.sums, op=dist.ReduceOp.SUM, group=self.layout.mesh.get_group(dim))

    def finish_alphas(self, ops: Any, hyper: Any) -> None:
        """Step 3 of NOTE [sharded parameters]: each tensor's alpha and fallback flag from its
        whole-tensor sums, and its blend marked pending, by the backend's ``llaca_alphas_`` op
        (``ops``: its namespace): the rule of the kernels' ``tensor_alpha``, in float64, then
        rounded to float32, or the horizon's (NOTE [horizon]). ``hyper``: the step's StepHyper
        (with ``found_inf`` set, the kernels changed nothing, and neither does this)."""
        ops.llaca_alphas_(self.sums, self.elements, self.alpha, self.alpha_fell_back,
                          *self.signal, self.pending, scale=hyper.scale,
                          base_weight=hyper.base_weight, mean_norms=hyper.mean_norms,
                          horizon=hyper.horizon, found_inf=hyper.found_inf)


class SegmentReduce:
    """The cross-rank part of a bucket that holds pieces ("segments") of tensors, each tensor
    cut across ranks (DeepSpeed ZeRO's flat partitions, NOTE [ZeRO partitions] in
    optim/zero.py). Like :class:`ShardReduce`, but a rank holds pieces of only some
    tensors, and possibly none: the kernels' sums of this rank's pieces (``sums``, a row per
    piece) go into the rows of their tensors in ``row_sums`` (a row per tensor of the partition,
    the same on every rank), one all-reduce over ``process_group`` adds the ranks' rows, and the
    alphas of every tensor of the partition are set in ``alpha`` and ``alpha_fell_back``, the state's
    vectors (one element per row). The pieces' blends are applied at once, through
    ``flags``."""

    def __init__(self, rows: list[int], elements: list[int], alpha: Tensor, alpha_fell_back: Tensor,
                 signal: list[Tensor] | None, process_group: Any) -> None:
        """``signal``: the partition's ``signal_log_mean`` and ``signal_count`` vectors, with
        horizon=H (NOTE [horizon])."""
        device = alpha.device
        # Each row's (whole tensor's) element count, for the mean norms (norms="mean").
        self.elements = torch.tensor(elements, dtype=torch.float64, device=device)
        self.process_group = process_group
        self.alpha, self.alpha_fell_back = alpha, alpha_fell_back
        none = torch.zeros(0, dtype=torch.float64, device=device)
        self.signal = signal if signal is not None else (none, none)
        self.rows = torch.tensor(rows, dtype=torch.long, device=device)
        self.sums = torch.zeros((len(rows), 3), dtype=torch.float64, device=device)
        self.row_sums = torch.zeros((alpha.numel(), 3), dtype=torch.float64, device=device)
        self._pending = torch.zeros(len(rows), dtype=torch.bool, device=device)
        self.flags = list(self._pending.unbind())
        self._row_pending = torch.zeros(alpha.numel(), dtype=torch.bool, device=device)

    def all_reduce(self) -> None:
        import torch.distributed as dist

        self.row_sums.zero_()
        self.row_sums.index_copy_(0, self.rows, self.sums)
        dist.all_reduce(self.row_sums, op=dist.ReduceOp.SUM, group=self.process_group)

    def finish_alphas(self, ops: Any, hyper: Any) -> None:
        """Every row's alpha and fallback flag into the state's vectors (the bucket's lists,
        the pieces' views of them, are not needed), by the backend's ``llaca_alphas_`` op
        (``ops``), and the pieces' blends marked in ``flags``."""
        self._row_pending.zero_()  # no blend of a row is pending before this step's
        ops.llaca_alphas_(self.row_sums, self.elements, self.alpha, self.alpha_fell_back,
                          *self.signal, self._row_pending, scale=hyper.scale,
                          base_weight=hyper.base_weight, mean_norms=hyper.mean_norms,
                          horizon=hyper.horizon, found_inf=hyper.found_inf)
        torch.index_select(self._row_pending, 0, self.rows, out=self._pending)  # no allocation


def finish_step(backend: Any, bucket: Any, hyper: Any) -> None:
    """Steps 2 to 4 of NOTE [sharded parameters] for a bucket whose kernels just wrote their
    local sums: reduce them, set the alphas (with the step's StepHyper ``hyper``), and blend now
    unless the bucket defers its blends."""
    shard = bucket.shard
    shard.all_reduce()
    flags = bucket.ema_pending or shard.flags
    shard.finish_alphas(backend.ops, hyper)
    if not bucket.ema_pending and bucket.params:
        step_bucket(backend, type(bucket)(params=bucket.params, emas=bucket.emas,
                                          alphas=bucket.alphas, ema_pending=flags), hyper, LLACA_FLUSH)
