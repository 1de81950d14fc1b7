"""DeepSpeed ZeRO: per-tensor LLaCA on the flat partitions DeepSpeed hands its client optimizer.

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
        return [part for ref, part in self._found.values() if ref() is not None]

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
        part = _stage3(t, given) or _stage12(t, given)
        if part is not None:
            part.row_shapes = [_shape(p) for p in part.rows]
            self._found[id(t)] = (weakref.ref(t), part)
        return part

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

def full_tensors(part: ZeroPartition, values: Tensor) -> list[Tensor]:
    """The whole tensors of ``part``'s rows, on every rank, from ``values``: the flat partition
    or a state tensor shaped like it (``ema``, ``exp_avg``...). One all-reduce of a buffer the
    size of the rows: a collective, which every rank must call in the same order."""
    import torch.distributed as dist

    numels = [s.numel() for s in part.row_shapes]
    offsets = [0]
    for n in numels:
        offsets.append(offsets[-1] + n)
    buffer = torch.zeros(offsets[-1], dtype=values.dtype, device=values.device)
    for seg in part.segments:
        buffer.narrow(0, offsets[seg.row] + seg.param_start, seg.numel).copy_(
            values.narrow(0, seg.start, seg.numel))
    dist.all_reduce(buffer, group=part.process_group)
    return [buffer.narrow(0, offsets[i], numels[i]).view(shape)
            for i, shape in enumerate(part.row_shapes)]


@torch.no_grad()
def push_masters_to_model(parts: Iterable[ZeroPartition]) -> None:
    """Copies the masters (the flat partitions) into DeepSpeed's model weights, as its own step
    does after updating them: stage 3 into each parameter's local piece (``ds_tensor``), stages
    1 and 2 into the whole parameters (one all-reduce per partition). A collective."""
    persistent = []
    for part in parts:
        if part.stage == 3:
            # A parameter gathered whole (kept between forwards when small, "persistent", or
            # left so by an evaluation): release that copy, gathered before the update.
            here = [p for p in part.rows if getattr(getattr(p, "ds_status", None), "name", "") == "AVAILABLE"]
            if here:
                here[0].partition(here)
            persistent += [p for p in part.rows if getattr(p, "ds_persist", False)]
            for seg in part.segments:
                local = part.rows[seg.row].ds_tensor.data
                local.narrow(0, 0, seg.numel).copy_(part.flat.narrow(0, seg.start, seg.numel))
        else:
            for p, whole in zip(part.rows, full_tensors(part, part.flat.detach())):
                p.data.copy_(whole)
    if persistent:  # gathered anew, as DeepSpeed does after its own step
        persistent[0].all_gather(persistent)


def is_zero_param(p: Tensor) -> bool:
    """Whether DeepSpeed ZeRO took ``p`` over (its master lives in a flat partition)."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def ema_state_dict(model: torch.nn.Module, optimizer: Any) -> dict[str, Tensor]:
    """The EMA of every parameter of ``model`` that ``optimizer`` (an ``LLaCAAdamW`` or
    ``LLaCA``, DeepSpeed's client optimizer) keeps one of, whole, by parameter name, on every
    rank: the weights to evaluate or deploy, as ``zero_to_fp32`` gives the live ones. Under ZeRO
    it gathers the pieces (one all-reduce per partition): every rank must call it. Empty before
    the first step."""
    optimizer.flush_ema()
    whole: dict[int, Tensor] = {}
    for part, state in optimizer._zero_states():
        if "ema" in state:
            for p, ema in zip(part.rows, full_tensors(part, state["ema"])):
                whole[id(p)] = ema
    out = {}
    for name, p in model.named_parameters():
        if id(p) in whole:
            out[name] = whole[id(p)]
        elif not is_zero_param(p):
            ema = optimizer.ema(p)
            if ema is not None:
                out[name] = ema.detach().clone()
    return out


def ema_weights_from_zero_checkpoint(checkpoint_dir: str, tag: str | None = None) -> dict[str, Tensor]:
    """The weights ``end_task()`` would leave in the model at a DeepSpeed ZeRO checkpoint (each
    parameter's EMA, or its live weights where it has none), whole, in fp32, by parameter name,
    read from the checkpoint files alone: no engine, no ranks, any stage. ``checkpoint_dir`` and
    ``tag`` are those of ``engine.save_checkpoint`` (``tag=None``: the ``latest`` file's).

    DeepSpeed's ``zero_to_fp32`` consolidates the fp32 masters from each rank's optim-states
    file; the EMAs lie beside them in the same files, in the optimizer's state, shaped like the
    masters (NOTE [ZeRO partitions]). So each file is copied with the EMAs in the masters' place
    into a temporary folder (the model-states files linked), and ``zero_to_fp32`` consolidates
    that: the same merging, padding and shapes as DeepSpeed's own."""
    import glob
    import os
    import shutil
    import tempfile

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # Absolute: the scratch folder links to these files, and a relative link would point nowhere.
    checkpoint_dir = os.path.abspath(os.fspath(checkpoint_dir))
    if tag is None:
        latest = os.path.join(checkpoint_dir, "latest")
        if not os.path.isfile(latest):
            raise FileNotFoundError(
                f"llaca_optim: no 'latest' file in {checkpoint_dir!r} to name the checkpoint's "
                "tag; pass the folder given to engine.save_checkpoint (with the Trainer: "
                "output_dir/checkpoint-N) and its tag")
        with open(latest) as f:
            tag = f.read().strip()
    source = os.path.join(checkpoint_dir, tag)
    optim_files = sorted(glob.glob(os.path.join(source, "*_optim_states.pt")))
    if not optim_files:
        raise FileNotFoundError(f"llaca_optim: no *_optim_states.pt files in {source!r}; pass the "
                                "folder and tag given to engine.save_checkpoint")
    loaded = []
    for path in optim_files:
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=False))
        except Exception as err:  # noqa: BLE001 - any unreadable file is named as the user's
            raise ValueError(
                f"llaca_optim: cannot read {path!r} ({type(err).__name__}: {err}); the file is "
                "damaged or was cut short (a save that did not finish?): save the checkpoint "
                "again, or use another one") from err
    ranks = loaded[0].get("optimizer_state_dict", {}).get("partition_count")
    ranks = max(ranks) if isinstance(ranks, (list, tuple)) else ranks
    if isinstance(ranks, int) and ranks != len(optim_files):
        raise FileNotFoundError(
            f"llaca_optim: the checkpoint in {source!r} was saved by {ranks} ranks but holds "
            f"{len(optim_files)} *_optim_states.pt files ({', '.join(map(os.path.basename, optim_files))}): "
            "a rank's file is missing (a save that did not finish, or files copied in part); "
            "use a complete checkpoint folder")
    scratch = tempfile.mkdtemp()
    try:
        target = os.path.join(scratch, tag)
        os.makedirs(target)
        for name in os.listdir(source):
            if not name.endswith("_optim_states.pt"):
                os.symlink(os.path.join(source, name), os.path.join(target, name))
        for path, saved in zip(optim_files, loaded):
            _emas_in_place_of_masters(saved["optimizer_state_dict"], path)
            torch.save(saved, os.path.join(target, os.path.basename(path)))
        try:
            return get_fp32_state_dict_from_zero_checkpoint(scratch, tag=tag)
        except Exception as err:  # noqa: BLE001 - name the user's folder, not the scratch copy
            message = f"llaca_optim: consolidating {source!r}: {str(err).replace(scratch, checkpoint_dir)}"
            try:
                renamed = type(err)(message)
            except Exception:  # noqa: BLE001 - an exception type with other arguments
                renamed = RuntimeError(message)
            raise renamed from err
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _emas_in_place_of_masters(zero_state: dict[str, Any], path: str) -> None:
    """Puts, in one rank's saved ZeRO optimizer state, each flat partition's EMA where its fp32
    masters are (a partition without an EMA keeps its masters), and drops the rest of the
    optimizer's state, which consolidation does not read."""
    if zero_state.get("zero_stage", 0) == 3:
        masters_key, client = "fp32_flat_groups", zero_state.pop("optimizer_state_dict", None)
    else:
        masters_key, client = "single_partition_of_fp32_groups", zero_state.pop("base_optimizer_state", None)
    if not isinstance(client, dict) or "state" not in client.get("llaca", client):
        raise ValueError(f"llaca_optim: {path!r} holds no state dict of LLaCAAdamW or LLaCA "
                         "(an elastic checkpoint, or another optimizer's)")
    state = client.get("llaca", client)["state"]  # the LLaCA wrapper saves it under "llaca"
    masters = zero_state[masters_key]
    for i, flat in enumerate(masters):
        ema = state.get(i, {}).get("ema")
        if ema is not None:  # stages 1 and 2 save the masters without the last rank's padding
            masters[i] = ema.reshape(-1)[: flat.numel()].to(flat.dtype).view_as(flat).clone()


def refusal(optimizer_name: str, kind: str) -> str:
    return (
        f"llaca_optim: {optimizer_name} is being stepped by DeepSpeed's {kind}, which hands the "
        "optimizer flat copies of the model's parameters, cut across tensor boundaries, and "
        "keeps no map from them back to the tensors. LLaCA's balance weight is one per "
        "parameter tensor and cannot be computed from such copies, so the step is refused and "
        "nothing was changed. Train with DeepSpeed's bf16 or ZeRO stages 1 to 3 (whose "
        "partitions llaca_optim maps back to the tensors), or shard with FSDP2 "
        "(torch.distributed.fsdp.fully_shard)")
