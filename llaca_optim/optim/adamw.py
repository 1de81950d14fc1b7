"""``LLaCAAdamW``: ``torch.optim.AdamW`` with the LLaCA EMA fused into the same kernel."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..ops.registry import Backend
from ..ops.roles import StepHyper
from ..ops.roles import ADAMW_LLACA, LLACA_STATE_KEYS
from ..presets import Preset
from . import validation
from .base import LLaCAOptimizerBase, eager_under_compile
from .plan import run_step

__all__ = ["LLaCAAdamW"]


class LLaCAAdamW(LLaCAOptimizerBase):
    r"""AdamW whose every step also updates the LLaCA EMA of each parameter.

    Drop-in for ``torch.optim.AdamW``: same signature, defaults, param-group keys, state layout
    (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and state-dict format, plus, per
    parameter, ``ema``, ``prev_grad``, ``alpha`` and ``alpha_fell_back``. With ``llaca=False`` it is
    AdamW: on the ``cpu`` backend bit for bit ``torch.optim.AdamW(fused=True)`` (docs/api.md says
    where else it is exact, and to what the other backends agree). After the AdamW update of a
    tensor ``p`` with gradient ``g``:

    .. math::
        \alpha = \mathrm{scale}\,\frac{1 + \lVert g\rVert_1}{\lVert p - \bar p\rVert_1\,
                 \lVert g - g_{prev}\rVert_1},\qquad
        \bar p \leftarrow \bar p + \alpha\,(p - \bar p)

    with :math:`\alpha` replaced by ``base_weight`` unless it lies in (0, 1) or when there is no
    previous gradient yet. At the end of a task, :meth:`end_task` copies the EMA into the weights.

    Args (beyond AdamW's):
        preset: ``"coin"`` (scale 2.0, base_weight 0.01, the authors' code),
            ``"continual-next"`` (0.01, 0.001) or ``"coin-mean"`` (``norms="mean"``, scale
            1e-9, base_weight 0.01).
        scale, base_weight, norms: override the preset. ``norms="sum"`` (the published update)
            forms alpha from the three L1 sums; ``"mean"`` from the L1 means (each sum over the
            tensor's number of elements), whose regime does not fall with the tensor's size
            (docs/spec.md section 2).
        horizon: the EMA's time constant in steps, in place of ``scale``, ``base_weight`` and
            ``norms``: each tensor's alpha is calibrated to about ``1 / horizon`` at any tensor
            size (its signal over the running geometric mean of its signal, capped at 0.5), and
            LLaCA's signal moves it up and down around that level (docs/continual.md,
            "Choosing settings").
        llaca: ``False`` turns the EMA off for the group (plain AdamW).
        ema_dtype: ``None`` (float32 for 16-bit parameters, else the parameter's dtype),
            ``"param"`` (the parameter's dtype, as the published code), or a torch dtype.
        defer_blend: let the backend defer each step's EMA blend to the next step (CUDA and
            CPU, for tensors too large to finish in one visit; Triton, for all), so that a step
            is one pass over memory. The EMA in ``optimizer.state`` then lags one blend behind until
            :meth:`flush_ema`, which every method here that reads EMAs (``ema``, ``ema_weights``,
            ``end_task``, ``state_dict``) calls first; results are bit-identical either way. If
            you change parameters in place between steps, call :meth:`flush_ema` first, or pass
            ``False``.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"``, ``"triton"``.
        foreach, capturable, fused: accepted as ``torch.optim.AdamW`` accepts them, so that code
            which passes them runs unchanged; like torch's, they choose an implementation and
            change no result. Ours is chosen by ``backend`` and is always fused and always
            capturable (the step counter lives on the device), whatever they say.
        differentiable: only ``False``: the kernels update in place outside autograd.

    All of ``preset``, ``scale``, ``base_weight``, ``norms``, ``horizon``, ``llaca``,
    ``ema_dtype`` and ``defer_blend`` are per param group.
    Works with ``torch.amp.GradScaler`` the way torch's fused AdamW does: the kernels unscale the
    gradients and skip the whole step (EMA included) when an overflow was found. Works with
    DTensor parameters (FSDP2's ``fully_shard``, tensor parallelism): the kernels run on the local
    shards and one all-reduce per bucket makes the alphas those of the whole tensors (NOTE
    [sharded parameters] in ``optim/sharded.py``).
    """

    # GradScaler hands us grad_scale/found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        preset: str = "coin",
        scale: float | None = None,
        base_weight: float | None = None,
        norms: str | None = None,
        horizon: float | None = None,
        llaca: bool = True,
        ema_dtype: Any = None,
        defer_blend: bool = True,
        backend: str | Backend = "auto",
    ) -> None:
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
            maximize=maximize, foreach=foreach, capturable=capturable,
            differentiable=differentiable, fused=fused, decoupled_weight_decay=True,
            preset=preset, scale=scale, base_weight=base_weight, norms=norms, horizon=horizon,
            llaca=llaca,
            ema_dtype=ema_dtype,
            defer_blend=defer_blend,
        )
        # Validate the defaults before torch builds any group, so the error names the argument.
        validation.validate_adamw_group(defaults, "constructor arguments")
        validation.resolve_llaca_knobs(defaults, "constructor arguments")
        if fused and backend == "reference":
            raise ValueError(
                "llaca_optim: fused=True asks for a fused implementation but backend='reference' "
                "is the per-tensor one; leave backend='auto' (or name cpu, cuda or triton)")
        super().__init__(params, defaults)
        self._setup_backend(backend)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._invalidate_plans()
        # Also what lets an AdamW state dict load into LLaCAAdamW: a LLaCA knob that a loaded
        # group lacks comes from this optimizer's own settings (its defaults, the constructor's
        # arguments), as a group added later takes them; the options torch's AdamW loader fills
        # in take torch's defaults (state dicts of older torch lack them).
        own = {key: self.defaults.get(key, value)
               for key, value in {**validation.LLACA_GROUP_DEFAULTS, "defer_blend": True}.items()}
        for group in self.param_groups:
            for key, value in {**own, "maximize": False, "amsgrad": False,
                               "decoupled_weight_decay": True, "foreach": None,
                               "capturable": False, "differentiable": False,
                               "fused": None}.items():
                group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self._add_group_checked(super().add_param_group, param_group)

    def _validate_group(self, group: dict[str, Any], where: str) -> Preset:
        validation.validate_adamw_group(group, where)
        return super()._validate_group(group, where)

    _op = ADAMW_LLACA

    def _parts(self, group: dict[str, Any]) -> frozenset[str]:
        parts = {"tensor", "adamw"}
        if group["amsgrad"]:
            parts.add("amsgrad")
        if group["llaca"]:
            parts |= self._llaca_parts(group)
            if group["defer_blend"]:
                parts.add("deferral")
        return frozenset(parts)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One AdamW + LLaCA step over every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._fused_step()
        return loss

    # Without gradient recording, as torch's optimizers step (the wrapper's update already did):
    # in grad mode each call of our ops goes through torch's autograd fallback for ops without a
    # derivative, which walks every tensor argument (the parameters require grad), a sizeable
    # part of the host time of a step over many small tensors. Nothing here is differentiable
    # (differentiable=True is refused).
    @eager_under_compile  # NOTE [torch.compile] in base.py
    @torch.no_grad()
    def _fused_step(self) -> None:
        self._check_not_swapped("step")
        plan = [(self._hyper(group, balance), buckets)
                for group, buckets, balance in self._plan_step() if buckets]
        run_step(plan, adamw=True, pending=self._pending)
        self._task_steps += 1

    def _hyper(self, group: dict[str, Any], balance: Preset) -> StepHyper:
        beta1, beta2 = (float(b) for b in group["betas"])
        return StepHyper(
            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=float(group["weight_decay"]),
            eps=float(group["eps"]), amsgrad=group["amsgrad"], maximize=group["maximize"],
            llaca=group["llaca"], scale=balance.scale, base_weight=balance.base_weight,
            mean_norms=balance.mean_norms, horizon=balance.horizon or 0.0,
            # GradScaler's, when it hands them to the step instead of unscaling itself.
            grad_scale=getattr(self, "grad_scale", None), found_inf=getattr(self, "found_inf", None),
        )

    def _step_count(self, p: Tensor) -> Any:
        return self.state.get(p, {}).get("step")

    def _reset_for_new_task(self, keep_moments: bool) -> None:
        if not keep_moments:
            self.state.clear()
            return
        for state in self.state.values():
            for key in LLACA_STATE_KEYS:
                state.pop(key, None)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state dict saved by LLaCAAdamW (or by torch.optim.AdamW: the EMA then starts
        afresh). EMAs keep their own dtype instead of being cast to the parameter's. A dict from
        another parameter layout, a group without its options, or an entry the next step could
        not use raises, naming it, and leaves this optimizer unchanged. A dict saved inside
        :meth:`ema_weights` also puts the live weights back into the parameters (NOTE [state
        dicts inside the EMA swap])."""
        self._check_not_swapped("load a state dict")
        state_dict = self._copy_state_dict(state_dict)
        id_map = self._check_layout(state_dict, "LLaCAAdamW")
        with self._restored_on_error(self):
            groups = self.param_groups
            super().load_state_dict(state_dict)
            self._zero.regroup(groups, self.param_groups)
            live, found = self._settle_loaded(state_dict, id_map, "LLaCAAdamW",
                                              validation.ADAMW_GROUP_KEYS)
        self._finish_load(live, found, "LLaCAAdamW")
        # Our state dicts hold no pending blends, but one copied from `state` itself may.
        self._pending.pending = any("ema_pending" in entry for entry in self.state.values())
