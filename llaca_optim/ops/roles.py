"""The per-tensor roles of the ops, declared once: everything else about them is derived here.

A role is one per-tensor list argument of the ops (``params``, ``exp_avgs``, ``emas``...). This
table says, for each, which optimizer-state entry it holds, its dtype and shape, which part of
the update needs it, and which ops read or write it. From it follow the op schemas
(``library.py``), the :class:`Bucket` that the optimizers fill and hand to a backend, the state
keys and slot dtypes that state dicts and checks use (``optim/validation.py``), and the rows of
the Triton kernels' address table (``ops/triton/``). The C++ twin is
``csrc/include/llaca/roles.h``; its order is the order here (a test compares them).

Adding a state tensor is adding one row here and one line in ``roles.h``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# The ops, by name; each role says what each does with it: "r" reads, "w" writes (and may read).
ADAMW_LLACA = "adamw_llaca_"
LLACA_UPDATE = "llaca_update_"
LLACA_FLUSH = "llaca_flush_"
OP_NAMES = (ADAMW_LLACA, LLACA_UPDATE, LLACA_FLUSH)


@dataclass(frozen=True)
class Role:
    arg: str                 # the op's list argument and the Bucket field
    state_key: str | None    # its entry in optimizer.state[param]; None: the parameter, the gradient
    dtype: str               # "param": the parameter's; "ema": the group's EMA dtype; else a torch dtype
    shaped: bool             # shaped like the parameter (else one element)
    part: str                # "tensor", "adamw", "amsgrad", "llaca" or "deferral" (see below)
    ops: dict[str, str]      # op name -> "r" or "w"
    init: float | str | None = None  # a new entry: filled with this number, or "copy" of the parameter

    @property
    def slot_dtype(self) -> torch.dtype | None:
        """The fixed dtype of a one-element slot (None for a role shaped like its parameter)."""
        return None if self.shaped else getattr(torch, self.dtype)

    def dtype_for(self, param: Tensor, ema_dtype: torch.dtype) -> torch.dtype:
        if self.dtype == "param":
            return param.dtype
        return ema_dtype if self.dtype == "ema" else getattr(torch, self.dtype)

    def new_entry(self, param: Tensor, ema_dtype: torch.dtype, slots: int | None = None) -> Tensor:
        """This role's state tensor for a parameter that has none yet. ``slots``: a one-element
        role's entry is a vector of that many elements (one per tensor of a DeepSpeed ZeRO
        partition, NOTE [ZeRO partitions] in optim/zero.py), else one element."""
        dtype = self.dtype_for(param, ema_dtype)
        if self.init == "copy":
            return param.detach().to(dtype, copy=True)
        if self.shaped:  # zeros_like where it can: DTensors take it with their placements
            fill = torch.zeros_like if self.init == 0 else (lambda t, **kw: torch.full_like(t, self.init, **kw))
            return fill(param, dtype=dtype, memory_format=torch.preserve_format)
        return torch.full(() if slots is None else (slots,), self.init, dtype=dtype, device=param.device)


_ALL_W = {ADAMW_LLACA: "w"}
# part: "tensor" (the parameter and its gradient), "adamw" (LLaCAAdamW's moments and counter),
# "amsgrad" (with amsgrad=True), "llaca" (the EMA state, made together), "horizon" (with
# horizon=H), "deferral" (the flag of a blend left pending, NOTE [deferred blend] in
# optim/deferred.py). A role with no op is state the optimizer keeps beside the ops' lists.
ROLES: tuple[Role, ...] = (
    Role("params", None, "param", True, "tensor",
         {ADAMW_LLACA: "w", LLACA_UPDATE: "r", LLACA_FLUSH: "r"}),
    Role("grads", None, "param", True, "tensor", {ADAMW_LLACA: "r", LLACA_UPDATE: "r"}),
    Role("exp_avgs", "exp_avg", "param", True, "adamw", _ALL_W, 0.0),
    Role("exp_avg_sqs", "exp_avg_sq", "param", True, "adamw", _ALL_W, 0.0),
    Role("max_exp_avg_sqs", "max_exp_avg_sq", "param", True, "amsgrad", _ALL_W, 0.0),
    # On the parameter's device, as in torch's fused AdamW: the kernels bump it.
    Role("state_steps", "step", "float32", False, "adamw", _ALL_W, 0.0),
    # The EMA starts as a copy of p; the first real step overwrites it with the stepped p. If
    # that step is skipped (AMP overflow) the EMA is still a faithful copy of the weights.
    Role("emas", "ema", "ema", True, "llaca",
         {ADAMW_LLACA: "w", LLACA_UPDATE: "w", LLACA_FLUSH: "w"}, "copy"),
    Role("prev_grads", "prev_grad", "param", True, "llaca", {ADAMW_LLACA: "w", LLACA_UPDATE: "w"}, 0.0),
    # The last balance weight, or -1 before the tensor's first LLaCA step: the "fresh" mark the
    # kernels read (library.py).
    Role("alphas", "alpha", "float32", False, "llaca",
         {ADAMW_LLACA: "w", LLACA_UPDATE: "w", LLACA_FLUSH: "r"}, -1.0),
    Role("alpha_fell_backs", "alpha_fell_back", "bool", False, "llaca",
         {ADAMW_LLACA: "w", LLACA_UPDATE: "w"}, False),
    # With horizon=H, the calibration of the balance weight (NOTE [horizon] in
    # optim/sharded.py): the running mean of the log of each tensor's signal, and the number of
    # steps it holds. No kernel reads them: the alpha op of the step's finish does, from the
    # kernels' sums. float64, as the op computes.
    Role("signal_log_means", "signal_log_mean", "float64", False, "horizon", {}, 0.0),
    Role("signal_counts", "signal_count", "float64", False, "horizon", {}, 0.0),
    # Set on the device while the EMA lacks the blend of the last step. Only tensors whose blend
    # may be deferred have it; state dicts never hold it, since they are taken after a flush.
    Role("ema_pending", "ema_pending", "bool", False, "deferral",
         {ADAMW_LLACA: "w", LLACA_FLUSH: "w"}, False),
)

BY_STATE_KEY = {role.state_key: role for role in ROLES if role.state_key is not None}


# The rows of a kernel's address table (apex's addresses[depth][tensor]; the Triton kernels and
# the CUDA workspace): arrays shaped like the parameter first, whose 16-byte alignment is checked
# together, then the one-element slots.
OP_ROLES: tuple[Role, ...] = tuple(r for r in ROLES if r.ops)  # the C++ table's rows
TABLE_ROWS: tuple[Role, ...] = (tuple(r for r in OP_ROLES if r.shaped)
                                + tuple(r for r in OP_ROLES if not r.shaped))
TABLE_ROW = {role.arg: i for i, role in enumerate(TABLE_ROWS)}
ARRAY_ROWS = sum(1 for r in OP_ROLES if r.shaped)


def roles_of(op: str) -> tuple[Role, ...]:
    """The list arguments of ``op``, in schema order."""
    return tuple(role for role in ROLES if op in role.ops)


# The order a step makes a parameter's state entries in: the table's, with the step counter
# first, as torch's AdamW makes them (a state dict then lists the keys in AdamW's order).
MADE_ORDER: tuple[Role, ...] = tuple(sorted((r for r in ROLES if r.state_key is not None),
                                            key=lambda r: r.arg != "state_steps"))


def state_keys(*parts: str) -> tuple[str, ...]:
    return tuple(r.state_key for r in MADE_ORDER if r.part in parts)


# optimizer.state entries, by what makes them (a step makes each part's entries together).
ADAMW_STATE = state_keys("adamw")                      # step, exp_avg, exp_avg_sq
LLACA_STATE = state_keys("llaca")                      # ema, prev_grad, alpha, alpha_fell_back
HORIZON_STATE = state_keys("horizon")                  # signal_log_mean, signal_count
# What a state dict holds of a parameter's entries: all but the deferral flag, which is flushed
# before any state dict is taken.
SAVED_STATE_KEYS = state_keys("adamw", "amsgrad", "llaca", "horizon")
UNSAVED_STATE_KEYS = state_keys("deferral")
LLACA_STATE_KEYS = state_keys("llaca", "horizon", "deferral")  # what end_task drops
SHAPED_STATE_KEYS = tuple(r.state_key for r in ROLES if r.shaped and r.state_key is not None)
SLOT_DTYPES: dict[str, torch.dtype] = {
    r.state_key: r.slot_dtype for r in ROLES if not r.shaped and r.state_key is not None}


def _lists() -> list[Tensor]:
    return []


@dataclass
class Bucket:
    """Per-tensor lists of one op call, one field per role of ``OP_ROLES``, in its order (empty
    when a part is off: the AdamW lists for the standalone update, the LLaCA lists with
    llaca=False, ``ema_pending`` when nothing may be deferred; tests/ops/test_roles.py holds the
    fields to the table), plus what the optimizer keeps with them: ``param_versions`` (the
    params' ``_version`` after the last deferring step), and for sharded parameters (NOTE
    [sharded parameters] in optim/sharded.py) the DTensors the lists hold the local shards of
    (``sources``) and their cross-shard reduction (``shard``, a ShardReduce); for pieces of
    DeepSpeed ZeRO partitions (NOTE [ZeRO partitions] in optim/zero.py) each piece's
    ``(start, numel)`` in its flat partition (``segments``), and ``shard``, a SegmentReduce."""

    params: list[Tensor] = field(default_factory=_lists)
    grads: list[Tensor] = field(default_factory=_lists)
    exp_avgs: list[Tensor] = field(default_factory=_lists)
    exp_avg_sqs: list[Tensor] = field(default_factory=_lists)
    max_exp_avg_sqs: list[Tensor] = field(default_factory=_lists)
    state_steps: list[Tensor] = field(default_factory=_lists)
    emas: list[Tensor] = field(default_factory=_lists)
    prev_grads: list[Tensor] = field(default_factory=_lists)
    alphas: list[Tensor] = field(default_factory=_lists)
    alpha_fell_backs: list[Tensor] = field(default_factory=_lists)
    ema_pending: list[Tensor] = field(default_factory=_lists)
    param_versions: list[int] | None = None
    sources: list[Tensor] | None = None
    shard: Any = None
    segments: list[tuple[int, int]] | None = None


def op_lists(bucket: Any, op: str) -> list[list[Tensor]]:
    """``bucket``'s lists in the order of ``op``'s list arguments."""
    return [getattr(bucket, role.arg) for role in roles_of(op)]


@dataclass
class StepHyper:
    """The hyperparameters of one group at one step, resolved (preset applied) and validated:
    the op's keyword arguments, as a backend passes them on."""

    lr: float | Tensor = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-2
    eps: float = 1e-8
    amsgrad: bool = False
    maximize: bool = False
    llaca: bool = True
    scale: float = 2.0
    base_weight: float = 0.01
    mean_norms: bool = False
    horizon: float = 0.0  # 0: off (the scale rule)
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None
