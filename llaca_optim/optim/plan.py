"""The step planner: which tensors a step updates, through which backend, in which buckets.

An optimizer declares what it steps: the op its buckets go to (at construction) and, per param
group at each step, its validated knobs and the parts of the role table it has on. The planner
makes the missing state from the role table, routes each parameter to a backend, fills the
buckets (one per backend, device, dtype, EMA dtype and shard layout), decides once per bucket
whether its blends are deferred, and caches the result. :func:`run_step` then runs a plan.
Nothing here calls back into the optimizer: what it needs is handed down.

NOTE [step plans]
Planning validates every gradient and looks at every state tensor, which costs microseconds per
parameter in Python: more than the kernel itself for thousands of small tensors. So a group's
plan is kept and reused while nothing it depends on changes; each step then only checks that the
same parameters have gradients with the same shape, dtype, device and strides (one comparison per
gradient) and puts this step's gradients into the buckets. Anything else (a parameter without a
gradient this time, a gradient of another layout, new groups, a new task, a loaded state dict,
any change to ``optimizer.state`` or its entries, which ``llaca_optim/state.py`` makes countable)
plans again from scratch, with the full checks. All groups are validated before any state is
made or any tensor touched (docs/spec.md section 6).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..ops.registry import Backend, BackendChoice, is_dtensor, reference_backend
from ..functional import step_bucket
from ..ops.roles import (ADAMW_LLACA, HORIZON_STATE, LLACA_UPDATE, MADE_ORDER, Bucket, Role,
                         StepHyper, roles_of)
from ..presets import Preset
from ..state import StateMap, counting
from . import sharded
from . import validation
from .deferred import PendingBlends
from .zero import ZeroPartition, ZeroPartitions, refusal

_REFERENCE = reference_backend()


def _as_is(t: Tensor) -> Tensor:
    return t


@dataclass
class GroupPlan:
    """A param group's buckets from the last full planning, and what they assumed."""

    params: list[Tensor]             # a copy of the group's params list (replaced or edited)
    parts: frozenset[str] | None     # the role-table parts the group had on
    ema_dtype: Any                   # the group's ema_dtype option
    has_grad: list[bool]
    grad_layouts: list[tuple[Any, ...]]  # (shape, dtype, device, stride) of each gradient
    buckets: list[tuple[Backend, Bucket, list[int]]]  # with each tensor's position among the grads


# One group of a step: (group, [(backend, bucket)], its balance weight's setting).
PlannedGroup = tuple[dict[str, Any], list[tuple[Backend, Bucket]], Preset]
# What the optimizer declares of a group: (its balance weight's setting, parts of the role table
# it has on).
Declared = tuple[Preset, "frozenset[str] | None"]


class StepPlanner:
    """Builds, caches and routes the buckets of one optimizer's steps.

    ``op``: the op the buckets are for (its role lists are what a bucket fills). ``backends``: the
    optimizer's backend choice, per device type. ``zero``: the parameters it was built with, and
    the DeepSpeed ZeRO partitions stepped in their place (NOTE [ZeRO partitions] in
    optim/zero.py). ``pending``: the blends left pending. ``owner``:
    the optimizer's name, for errors. Each step hands :meth:`plan` the groups, what the optimizer
    declared of each (its validated knobs and the parts of the role table it has on), and the
    state: the planner reads nothing else of the optimizer."""

    def __init__(self, *, op: str, backends: BackendChoice, zero: ZeroPartitions,
                 pending: PendingBlends, owner: str) -> None:
        self.op = op
        self.roles: tuple[Role, ...] = roles_of(op)
        self.backends = backends
        self.zero = zero
        self.pending = pending
        self.owner = owner
        self.invalidate()

    def invalidate(self) -> None:
        self._plans: dict[Any, GroupPlan] = {}
        self._planned_state: tuple[StateMap, int] | None = None

    def planned_buckets(self) -> list[tuple[Backend, Bucket]]:
        """Every bucket of the cached plans (what a captured CUDA graph replays)."""
        return [(backend, bucket) for plan in self._plans.values() for backend, bucket, _ in plan.buckets]

    # ------------------------------------------------------------------ planning

    def plan(self, groups: list[dict[str, Any]], declared: list[Declared], state: Any
             ) -> tuple[StateMap, list[PlannedGroup]]:
        """This step's groups with their buckets, and the state map to keep (``state`` itself,
        or a counting map that adopted what the user put in its place). ``declared`` holds, per
        group, its ``(balance, parts)``: validated knobs, and the parts of the role
        table it has on (None: the group is not stepped here)."""
        planned = self._planned_state
        state_changed = planned is None or state is not planned[0] or planned[0].changes != planned[1]
        if state_changed:
            state = counting(state)  # adopts a map or entries the user put in
            self.invalidate()
        plans: list[list[Any]] = []
        to_build = []
        for gi, (group, (balance, parts)) in enumerate(zip(groups, declared)):
            key = self._plan_key(gi, group)
            buckets = self._reuse(key, group, parts)
            if buckets is None:
                to_build.append((len(plans), key, group, parts, self._validated_pairs(gi, group, state)))
            plans.append([group, buckets, balance])
        if to_build:
            self._check_step_tensors(groups, state, with_state=state_changed)
        flush_first: list[Tensor] = []
        for index, key, group, parts, pairs in to_build:
            built = self._build(group, parts, pairs, state, flush_first) if parts is not None else []
            self._plans[key] = GroupPlan(
                params=list(group["params"]), parts=parts, ema_dtype=group.get("ema_dtype"),
                has_grad=[p.grad is not None for p in group["params"]],
                grad_layouts=[(g.shape, g.dtype, g.device, g.stride()) for _, g in pairs],
                buckets=built,
            )
            plans[index][1] = [(backend, bucket) for backend, bucket, _ in built]
        if flush_first:
            # Tensors with a blend pending whose new route blends within the step (another
            # backend, or defer_blend turned off): apply it now, before that step runs.
            self.pending.flush([(p, state.get(p)) for p in flush_first], drop=True)
        self._planned_state = (state, state.changes)  # after planning's own changes
        return state, [tuple(p) for p in plans]  # type: ignore[misc]

    def _plan_key(self, gi: int, group: dict[str, Any]) -> Any:
        """A group's key in the plan cache: its index, and under ZeRO stage 3 also its flat
        partition, since DeepSpeed steps a group's sub-groups one after the other, each with its
        own flat tensor in the group (NOTE [ZeRO partitions])."""
        params = group["params"]
        if len(params) == 1 and self.zero.may_be_partition(params[0]):
            return (gi, id(params[0]))
        return gi

    def _reuse(self, key: Any, group: dict[str, Any], parts: frozenset[str] | None
               ) -> list[tuple[Backend, Bucket]] | None:
        plan = self._plans.get(key)
        params = group["params"]
        if plan is None or plan.parts != parts or plan.ema_dtype != group.get("ema_dtype"):
            return None
        grads = [p.grad for p in params]
        if [g is not None for g in grads] != plan.has_grad:  # also catches a changed length
            return None
        if not all(map(operator.is_, params, plan.params)):
            return None
        present = [g for g in grads if g is not None]
        strided = torch.strided
        for g, (shape, dtype, device, stride) in zip(present, plan.grad_layouts):
            if (g.stride() != stride or g.shape != shape or g.dtype != dtype
                    or g.device != device or g.layout != strided):
                return None
        for _, bucket, positions in plan.buckets:
            if bucket.segments is not None:  # pieces of a ZeRO partition: of its new gradient
                bucket.grads = [present[positions[0]].narrow(0, start, numel)
                                for start, numel in bucket.segments]
                continue
            if bucket.sources is None:
                bucket.grads = [present[i] for i in positions]
                continue
            # FSDP may swap a parameter's local tensor (lazy init, reloads): plan again then.
            if any(sharded.local(p) is not q for p, q in zip(bucket.sources, bucket.params)):
                return None
            bucket.grads = [sharded.local(present[i]) for i in positions]
        return [(backend, bucket) for backend, bucket, _ in plan.buckets]

    def _validated_pairs(self, gi: int, group: dict[str, Any], state: Any
                         ) -> list[tuple[Tensor, Tensor]]:
        pairs = []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            label = validation.param_label(group, gi, pi)
            validation.check_gradient(p, p.grad, label)
            if p in state:  # what the user may have put there (see state.py)
                partition = self.zero.partition(group, p)
                validation.check_state(p, state[p], label, adamw=self.op == ADAMW_LLACA,
                              llaca=bool(group["llaca"]), slots=len(partition.rows) if partition else 1)
            pairs.append((p, p.grad))
        return pairs

    def _check_step_tensors(self, groups: list[dict[str, Any]], state: Any, with_state: bool) -> None:
        """Checks across all groups, made whenever a group is planned anew, before any state is
        made: a step over DeepSpeed's flat partitions is refused (optim/zero.py);
        each parameter stands once; no tensor the step writes shares memory with another one it
        touches (the fused kernels would race on it, threads updating one tensor twice). The
        state tensors are among those compared ``with_state``: when the state was loaded or
        edited since the last planning. Otherwise they are those checked then, or made by the
        planner since (each in memory of its own), and only parameters and gradients are
        compared: a third of the work, for the re-planning of steps whose gradients come and go."""
        stepped = [(gi, pi, group, p) for gi, group in enumerate(groups)
                   for pi, p in enumerate(group["params"]) if p.grad is not None]
        kind = self.zero.unsupported((group, p) for _, _, group, p in stepped)
        if kind is not None:
            raise RuntimeError(refusal(self.owner, kind))
        validation.check_each_param_once(groups)
        local = sharded.local if sharded.any_sharded() else _as_is
        items = []
        for owner, (_, _, _, p) in enumerate(stepped):
            items.append((local(p), "the parameter", owner, True))
            items.append((local(p.grad), "its gradient", owner, False))
            for key, value in (state.get(p, {}) if with_state else {}).items():
                if isinstance(value, Tensor):
                    items.append((local(value), f"optimizer.state[param][{key!r}]", owner, True))

        def describe(owner: int) -> str:
            gi, pi, group, _ = stepped[owner]
            return validation.param_label(group, gi, pi)

        validation.check_no_shared_memory(items, describe)

    def _build(self, group: dict[str, Any], parts: frozenset[str],
               pairs: list[tuple[Tensor, Tensor]], state: Any, flush_first: list[Tensor]
               ) -> list[tuple[Backend, Bucket, list[int]]]:
        """Makes missing state, sorts ``pairs`` into buckets and decides which defer; returns
        each bucket with the positions in ``pairs`` of its tensors. Tensors that had a blend
        pending and now go to a bucket that does not defer are added to ``flush_first``."""
        roles = [r for r in self.roles if r.part in parts and r.part != "deferral"]
        # The state made: the lists' and the horizon's statistic (no op's list: the finish's).
        made = [r for r in MADE_ORDER if r in roles or (r.part == "horizon" and r.part in parts)]
        llaca = "llaca" in parts
        horizon = "horizon" in parts
        opened: dict[tuple[Any, ...], tuple[Backend, Bucket, list[int], list[tuple[Tensor, Any]]]] = {}
        built = []
        for position, (p, g) in enumerate(pairs):
            entry = state[p]
            partition = self.zero.partition(group, p)
            if partition is not None:
                built.append((*self._build_partition(p, g, entry, partition, group, roles, made,
                                                     llaca, horizon),
                              [position] * len(partition.segments)))
                continue
            _make_missing_state(p, entry, made, group)
            companions = [entry[r.state_key] for r in made if r.shaped]
            backend, layout = self._route(p, [g, *companions])
            key = (backend.name, p.device, p.dtype, entry["ema"].dtype if llaca else None, layout)
            _, bucket, positions, members = opened.setdefault(
                key, (backend, Bucket(sources=[] if layout is not None else None), [], []))
            positions.append(position)
            members.append((p, entry))
            view = _as_is
            if layout is not None:
                view = sharded.local
                bucket.sources.append(p)
            for role in roles:
                value = p if role.arg == "params" else g if role.arg == "grads" else entry[role.state_key]
                getattr(bucket, role.arg).append(view(value) if role.shaped else value)
        for key, (backend, bucket, positions, members) in opened.items():
            layout = key[-1]
            if layout is not None and layout.sum_dims and llaca:
                # The cross-shard reduction of the sums (a DTensor replicated on every mesh
                # dimension needs none: each rank holds the whole tensor and computes the same
                # alpha as the others).
                bucket.shard = sharded.ShardReduce(layout, [p.numel() for p in bucket.sources],
                                                   bucket.params[0].device)
            elif horizon:  # the same finish, with nothing to reduce (NOTE [horizon])
                bucket.shard = sharded.ShardReduce(None, [p.numel() for p in bucket.params],
                                                   bucket.params[0].device)
            # Deferring needs a backend that defers and a tensor its kernels do not finish in one
            # visit (or a sharded bucket, whose blend comes after the reduction anyway); a bucket
            # that would never leave a blend pending gets no flags: one list less to pass.
            defer = ("deferral" in parts and backend.defers_blend
                     and (bucket.shard is not None or backend.may_defer(bucket.params)))
            for p, entry in members:
                if defer:
                    if "ema_pending" not in entry:
                        entry["ema_pending"] = torch.zeros((), dtype=torch.bool, device=p.device)
                    bucket.ema_pending.append(entry["ema_pending"])
                elif "ema_pending" in entry:
                    flush_first.append(p)  # its new route would not apply the pending blend
            if bucket.shard is not None:
                bucket.shard.hold_slots(bucket, [entry for _, entry in members], horizon)
            built.append((backend, bucket, positions))
        return built

    def _build_partition(self, p: Tensor, g: Tensor, entry: dict[str, Any],
                         partition: ZeroPartition, group: dict[str, Any],
                         roles: list[Role], made: list[Role], llaca: bool, horizon: bool
                         ) -> tuple[Backend, Bucket]:
        """The bucket of a ZeRO partition ``p`` (NOTE [ZeRO partitions]): its lists hold this
        rank's pieces of the partition's tensors, views into ``p``, its gradient and its flat
        state; the per-tensor slots are vectors with an element per tensor of the partition.
        Its blends are applied within the step, after the cross-rank reduction."""
        _make_missing_state(p, entry, made, group, slots=len(partition.rows))
        shaped = [r for r in made if r.shaped]
        backend = self.backends(p.device.type)
        for seg in partition.segments:
            if not backend.accepts(p.narrow(0, seg.start, seg.numel),
                                   [t.narrow(0, seg.start, seg.numel)
                                    for t in (g, *(entry[r.state_key] for r in shaped))]):
                backend = _REFERENCE
                break
        bucket = Bucket(segments=[(seg.start, seg.numel) for seg in partition.segments])
        for seg in partition.segments:
            for role in roles:
                value = p if role.arg == "params" else g if role.arg == "grads" else entry[role.state_key]
                piece = value.narrow(0, seg.start, seg.numel) if role.shaped else value[seg.row]
                getattr(bucket, role.arg).append(piece)
        if llaca:
            bucket.shard = sharded.SegmentReduce([seg.row for seg in partition.segments],
                                                 [shape.numel() for shape in partition.row_shapes],
                                                 entry["alpha"], entry["alpha_fell_back"],
                                                 [entry[key] for key in HORIZON_STATE]
                                                 if horizon else None,
                                                 partition.process_group)
        return backend, bucket

    def _route(self, p: Tensor, companions: list[Tensor]) -> tuple[Backend, Any]:
        """The backend of ``p`` and, for a DTensor whose local shards it takes, the shards'
        layout (a ShardLayout: the bucket then holds local shards, NOTE [sharded parameters]).
        Other DTensors go to the reference backend whole. A tensor the backend's kernels do not
        take (float64, layouts with gaps) goes to the reference: never a contiguous copy updated
        in place of the real tensor."""
        if not is_dtensor(p):
            backend = self.backends(p.device.type)
            return (backend if backend.accepts(p, companions) else _REFERENCE), None
        layout = sharded.layout_of(p, companions)
        if layout is not None:
            backend = self.backends(p.device.type)
            if backend.runs_on_shards and backend.accepts(sharded.local(p), [sharded.local(t) for t in companions]):
                return backend, layout
        return _REFERENCE, None


def _make_missing_state(p: Tensor, entry: dict[str, Any], made: list[Role], group: dict[str, Any],
                        slots: int | None = None) -> None:
    """Makes the state entries of ``made`` that ``p`` lacks, from the role table (``slots``: see
    ``Role.new_entry``)."""
    if any(r.state_key not in entry for r in made):
        ema_dtype = validation.ema_dtype_for(p, group.get("ema_dtype"))
        with torch.no_grad():
            for role in made:
                if role.state_key not in entry:
                    entry[role.state_key] = role.new_entry(p, ema_dtype, slots)


def run_step(plan: list[tuple[StepHyper, list[tuple[Backend, Bucket]]]], adamw: bool,
             pending: PendingBlends) -> None:
    """Runs a plan, given as each group's hyperparameters and buckets: for each bucket, the op
    (``adamw_llaca_`` if ``adamw``, else ``llaca_update_``), then, for a sharded bucket, the
    cross-shard partition of its LLaCA update (NOTE [sharded parameters])."""
    for hyper, buckets in plan:
        for backend, bucket in buckets:
            if bucket.ema_pending:
                pending.before_step(bucket)
            if not bucket.params:
                pass  # a ZeRO partition with no piece on this rank: it joins the reduction only
            else:
                step_bucket(backend, bucket, hyper, ADAMW_LLACA if adamw else LLACA_UPDATE)
            if bucket.shard is not None:
                sharded.finish_step(backend, bucket, hyper)
