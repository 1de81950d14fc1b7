"""Recognising DeepSpeed's ZeRO partitions, which the optimizers refuse until they support them.

``deepspeed.initialize(model=..., optimizer=LLaCAAdamW(model.parameters()), ...)`` with ZeRO
stage 1, 2 or 3 (or DeepSpeed's bf16 optimizer) replaces each param group's parameters by one
flat fp32 tensor: this rank's partition of the group's parameters laid end to end, cut across
tensor boundaries. LLaCA's balance weight is one per parameter tensor (sums over the whole
tensor), so a step over such a partition would compute one alpha for pieces of many tensors and
train without an error into an EMA far from the unsharded one. Until the partitions are mapped
back to their tensors, a step over them is refused.

How they are recognised: DeepSpeed marks the model parameters it takes over (``ds_id`` in stage
3; ``_hp_mapping``, the link to the fp32 partition, in stages 1 and 2 and in its bf16 optimizer)
or, in its fused fp16 optimizer (GPU only), makes them views of one flat buffer; and the tensors
in the optimizer's groups are then not the parameters it was built with. Both must hold, so that
a model merely built under DeepSpeed, whose own parameters an optimizer steps, is not refused,
nor are DeepSpeed's unfused fp16 optimizer's fp32 copies, one per parameter (per-tensor LLaCA is
right on them). Nothing here imports DeepSpeed: without it loaded there is nothing to find.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable

from torch import Tensor

# What each mark says of the partitioning, for the error.
_MARKS = (
    ("ds_id", "ZeRO stage 3"),
    ("_hp_mapping", "ZeRO stage 1 or 2 (or its bf16 optimizer)"),
)


class GivenParams:
    """The parameters an optimizer was built with (and those added to it), held weakly: the
    model owns them, and DeepSpeed drops them from the optimizer's groups."""

    def __init__(self) -> None:
        self._refs: dict[int, weakref.ref] = {}

    def add(self, params: Iterable[Tensor]) -> None:
        for p in params:
            self._refs[id(p)] = weakref.ref(p)

    def partitioning(self, stepped: Iterable[Tensor]) -> str | None:
        """The kind of ZeRO partitioning when the ``stepped`` tensors are DeepSpeed's partitions
        of the given parameters, else None."""
        if "deepspeed" not in sys.modules:
            return None
        if all(self._given(t) for t in stepped):
            return None
        storages = set()
        for ref in self._refs.values():
            p = ref()
            if p is None:
                continue
            for mark, kind in _MARKS:
                if hasattr(p, mark):
                    return kind
            if p.numel() and not p.is_meta:
                storage = (p.device, p.untyped_storage().data_ptr())
                if storage in storages:
                    return "fp16 optimizer (parameters flattened into one buffer)"
                storages.add(storage)
        return None

    def _given(self, t: Tensor) -> bool:
        ref = self._refs.get(id(t))
        return ref is not None and ref() is t


def refusal(optimizer_name: str, kind: str) -> str:
    return (
        f"llaca_optim: {optimizer_name} is being stepped by DeepSpeed {kind}, which hands the "
        "optimizer flat partitions of the model's parameters, cut across tensor boundaries, in "
        "place of the parameters. LLaCA's balance weight is one per parameter tensor and cannot "
        "be computed from such partitions, so the step is refused and nothing was changed. "
        "Train without ZeRO partitioning (DeepSpeed stage 0 in fp32, or torch's DDP), or shard "
        "with FSDP2 (torch.distributed.fsdp.fully_shard), which llaca_optim supports")
