"""DeepSpeed ZeRO's flat partitions mapped back to the tensors they cut across: the optimizer
layer's partition of per-tensor LLaCA under ZeRO (the adapters for users are in
llaca_optim/integrations/deepspeed.py).

NOTE [ZeRO partitions]
``deepspeed.initialize(model=..., optimizer=LLaCAAdamW(model.parameters()), config=...)`` with
ZeRO stage 1, 2 or 3 does not step the model's parameters through the optimizer. It hands the
optimizer, per param group (stage 3: per sub-group), one flat fp32 tensor: this rank's partition
of the group's parameters laid end to end, cut across tensor boundaries (the "master" weights;
in bf16 training the only fp32 copy). LLaCA's balance weight is one per *original* tensor, from
sums over the whole tensor, so a step over the flat tensor as if it were one parameter would
train, without an error, into an EMA far from the unsharded one. Here each flat tensor is mapped
back to its pieces ("segments") of the original tensors, through what DeepSpeed keeps of the
mapping:

* stages 1 and 2 (and DeepSpeed's bf16 optimizer): each model parameter holding a piece of this
  rank's partition has ``_hp_mapping`` (a ``tensor_fragment``), whose ``hp_fragment_address``
  is the piece's place in the flat partition and ``lp_fragment_address`` its place in the
  parameter; a parameter with no piece here has ``_hp_mapping = None``. ``_dp_group`` is the
  group the partition is cut across.
* stage 3: every parameter is cut on its own into ``partition_numel()`` elements per rank
  (``ds_process_group``); the optimizer's ``grad_position[ds_id]`` gives its sub-group and its
  offset in that sub-group's flat tensor; this rank holds elements ``rank * partition_numel()``
  onward, the last rank's piece padded.

A partition's tensors ("rows") are the same on every rank, in the same order; a rank may hold
pieces of a few of them, or of none. The step planner (optim/plan.py) makes one bucket per flat
tensor whose lists hold the pieces (views into the flat tensor and its flat state), and
``SegmentReduce`` (optim/sharded.py) finishes the step: the kernels write each piece's sums in
their sharded mode, the sums go to their rows, one all-reduce per partition adds the ranks'
rows, every row's alpha is computed from its whole-tensor sums, and each piece is blended. No
host synchronisation, no gather of whole tensors, one launch per bucket.

The state of a flat tensor: ``exp_avg``, ``exp_avg_sq``, ``ema``, ``prev_grad`` shaped like it
(DeepSpeed's ``safe_get_full_optimizer_state(param, "ema")`` then finds a parameter's EMA, as it
finds ``exp_avg``), and ``step``, ``alpha``, ``alpha_fell_back`` as vectors with one element per
row. DeepSpeed saves the client optimizer's state dict in its checkpoints, so they hold all of
it. The model's weights are DeepSpeed's copies of the masters: after ``end_task`` and around
``ema_weights`` they are refreshed from the masters (:func:`push_masters_to_model`).

Nothing here imports DeepSpeed: without it loaded there is nothing to find.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    """One piece of an original tensor in a flat partition."""

    row: int          # the tensor's row in its partition
    start: int        # where the piece starts in the flat partition
    numel: int
    param_start: int  # where it starts in the flattened original tensor


@dataclass(eq=False)
class ZeroPartition:
    """A flat partition DeepSpeed hands the optimizer, mapped back to its tensors."""

    stage: int                     # 3, or 1 for stages 1 and 2 and the bf16 optimizer (one layout)
    flat: Tensor
    rows: list[Tensor]             # the model parameters cut into this partition, on every rank
    segments: list[Segment]        # this rank's pieces of them, in flat order
    process_group: Any             # the ranks the partition is cut across
    row_shapes: list[torch.Size] = field(default_factory=list)


def _shape(p: Tensor) -> torch.Size:
    return getattr(p, "ds_shape", None) or p.shape  # stage 3 parameters are empty outside forward


def _same_memory(a: Tensor, b: Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


class ZeroPartitions:
    """The parameters an optimizer was built with, by param group (held weakly: the model owns
    them, and DeepSpeed takes them out of the groups), and the ZeRO partitions found in their
    place (NOTE [ZeRO partitions])."""

    def __init__(self) -> None:
        self._given: dict[int, list[weakref.ref]] = {}   # id(group dict) -> its parameters
        self._given_ids: set[int] = set()
        self._found: dict[int, tuple[weakref.ref, ZeroPartition]] = {}  # id(flat) -> its map

    # ------------------------------------------------------------------ the given parameters

    def add(self, group: dict[str, Any]) -> None:
        refs = [weakref.ref(p) for p in group["params"]]
        self._given[id(group)] = refs
        self._given_ids.update(id(p) for p in group["params"])

    def regroup(self, old_groups: list[dict[str, Any]], new_groups: list[dict[str, Any]]) -> None:
        """torch's ``load_state_dict`` replaces the group dicts: the new ones, in the same order,
        hold the same parameters."""
        if len(old_groups) == len(new_groups):
            given = {id(new): self._given[id(old)] for old, new in zip(old_groups, new_groups)
                     if id(old) in self._given}
            self._given.update(given)

    # ------------------------------------------------------------------ the partitions

    def may_be_partition(self, t: Tensor) -> bool:
        """Cheap: whether ``t`` could be a ZeRO partition (DeepSpeed is loaded and ``t`` is not
        one of the given parameters)."""
        return "deepspeed" in sys.modules and id(t) not in self._given_ids

    def get(self, t: Tensor) -> ZeroPartition | None:
        """The partition already found for ``t``."""
        found = self._found.get(id(t))
        return found[1] if found is not None and found[0]() is t else None

    def partitions(self) -> list[ZeroPartition]:
        """Every partition found so far (live ones), in the order first stepped."""
        return [partition for ref, partition in self._found.values() if ref() is not None]

    def partition(self, group: dict[str, Any] | None, t: Tensor) -> ZeroPartition | None:
        """The map of ``t`` when it is a ZeRO partition of ``group``'s parameters (stage 3: of
        any group's), else None."""
        if not self.may_be_partition(t):
            return None
        found = self.get(t)
        if found is not None:
            return found
        refs = self._given.get(id(group), []) if group is not None else [
            ref for refs in self._given.values() for ref in refs]
        given = [p for p in (ref() for ref in refs) if p is not None]
        partition = _stage3(t, given) or _stage12(t, given)
        if partition is not None:
            partition.row_shapes = [_shape(p) for p in partition.rows]
            self._found[id(t)] = (weakref.ref(t), partition)
        return partition

    def unsupported(self, stepped: Iterable[tuple[dict[str, Any], Tensor]]) -> str | None:
        """Why a step over ``stepped`` (each a group and a tensor of it) cannot be taken, or
        None. DeepSpeed's fused fp16 optimizer (GPU only) makes a group's parameters views of one
        flat buffer and puts in their place, in that group, one flat fp32 copy of them all,
        keeping no map from the copy back to the tensors. It is recognised by exactly that: in a
        group the optimizer was built with, a tensor that is none of its parameters, flat, of
        the size of the group's parameters together, which share one buffer. Having DeepSpeed
        imported is not enough (a model may keep its weights as views of one buffer, and a group
        added behind the optimizer's back holds parameters it was not given)."""
        if "deepspeed" not in sys.modules:
            return None
        for group, t in stepped:
            if id(t) in self._given_ids:
                continue
            given = [p for p in (ref() for ref in self._given.get(id(group), ())) if p is not None]
            if len(given) < 2 or t.dim() != 1 or t.numel() != sum(p.numel() for p in given):
                continue  # one tensor's flat copy is that tensor: per-tensor LLaCA is right
            if any(is_zero_param(p) for p in given):
                continue  # ZeRO: mapped by partition()
            storages = {(p.device, p.untyped_storage().data_ptr()) for p in given
                        if p.numel() and not p.is_meta}
            if len(storages) == 1:
                return "fp16 optimizer (parameters flattened into one buffer)"
        return None


def _stage3(flat: Tensor, given: list[Tensor]) -> ZeroPartition | None:
    import torch.distributed as dist

    placed = []
    for p in given:
        zero = getattr(p, "_z3_optimizer", None)
        if zero is None or not hasattr(p, "ds_id") or not p.requires_grad:
            continue
        sub_group, offset, per_rank = zero.grad_position[zero.get_param_id(p)]
        if zero.fp32_partitioned_groups_flat[sub_group] is flat:
            placed.append((offset, per_rank, p))
    if not placed:
        return None
    placed.sort(key=lambda item: item[0])
    group = placed[0][2].ds_process_group
    rank = dist.get_rank(group=group)
    rows, segments = [], []
    for row, (offset, per_rank, p) in enumerate(placed):
        rows.append(p)
        start = rank * per_rank
        numel = max(0, min(per_rank, p.ds_numel - start))  # the last rank's piece is padded
        if numel:
            segments.append(Segment(row, offset, numel, start))
    return ZeroPartition(3, flat, rows, segments, group)


def _stage12(flat: Tensor, given: list[Tensor]) -> ZeroPartition | None:
    rows = [p for p in given if hasattr(p, "_hp_mapping")]
    if not rows:
        return None
    segments = []
    for row, p in enumerate(rows):
        fragment = p._hp_mapping
        if fragment is None:
            continue  # no piece of it on this rank
        if not _same_memory(fragment.hp_fragment, flat):
            raise RuntimeError(
                "llaca_optim: a parameter of this param group is mapped by DeepSpeed into another "
                "flat partition than the one the group holds; the optimizer's param groups must "
                "be the ones DeepSpeed was given (do not regroup after deepspeed.initialize)")
        segments.append(Segment(row, fragment.hp_fragment_address.start,
                                fragment.hp_fragment_address.numel,
                                fragment.lp_fragment_address.start))
    segments.sort(key=lambda s: s.start)
    return ZeroPartition(1, flat, rows, segments, rows[0]._dp_group)


# ---------------------------------------------------------------------- whole tensors

def full_tensors(partition: ZeroPartition, values: Tensor) -> list[Tensor]:
    """The whole tensors of ``partition``'s rows, on every rank, from ``values``: the flat partition
    or a state tensor shaped like it (``ema``, ``exp_avg``...). One all-reduce of a buffer the
    size of the rows: a collective, which every rank must call in the same order."""
    import torch.distributed as dist

    numels = [s.numel() for s in partition.row_shapes]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    buffer = torch.zeros(offsets[-1], dtype=values.dtype, device=values.device)
    for seg in partition.segments:
        buffer.narrow(0, offsets[seg.row] + seg.param_start, seg.numel).copy_(
            values.narrow(0, seg.start, seg.numel))
    dist.all_reduce(buffer, group=partition.process_group)
    return [buffer.narrow(0, offsets[i], numels[i]).view(shape)
            for i, shape in enumerate(partition.row_shapes)]


@torch.no_grad()
def push_masters_to_model(partitions: Iterable[ZeroPartition]) -> None:
    """Copies the masters (the flat partitions) into DeepSpeed's model weights, as its own step
    does after updating them: stage 3 into each parameter's local piece (``ds_tensor``), stages
    1 and 2 into the whole parameters (one all-reduce per partition). A collective."""
    persistent = []
    for partition in partitions:
        if partition.stage == 3:
            # A parameter gathered whole (kept between forwards when small, "persistent", or
            # left so by an evaluation): release that copy, gathered before the update.
            here = [p for p in partition.rows if getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"]
            if here:
                here[0].partition(here)
            persistent += [p for p in partition.rows if getattr(p, "ds_persist", False)]
            for seg in partition.segments:
                local = partition.rows[seg.row].ds_tensor.data
                local.narrow(0, 0, seg.numel).copy_(partition.flat.narrow(0, seg.start, seg.numel))
        else:
            for p, whole in zip(partition.rows, full_tensors(partition, partition.flat.detach())):
                p.data.copy_(whole)
    if persistent:  # gathered anew, as DeepSpeed does after its own step
        persistent[0].all_gather(persistent)


def is_zero_param(p: Tensor) -> bool:
    """Whether DeepSpeed ZeRO took ``p`` over (its master lives in a flat partition)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def refusal(optimizer_name: str, kind: str) -> str:
    return (
        f"llaca_optim: {optimizer_name} is being stepped by DeepSpeed's {kind}, which hands the "
        "optimizer flat copies of the model's parameters, cut across tensor boundaries, and "
        "keeps no map from them back to the tensors. LLaCA's balance weight is one per "
        "parameter tensor and cannot be computed from such copies, so the step is refused and "
        "nothing was changed. Train with DeepSpeed's bf16 or ZeRO stages 1 to 3 (whose "
        "partitions llaca_optim maps back to the tensors), or shard with FSDP2 "
        "(torch.distributed.fsdp.fully_shard)")
