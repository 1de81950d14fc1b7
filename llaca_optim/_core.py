"""What LLaCAAdamW and the LLaCA wrapper share: backend choice, per-parameter LLaCA state, the
task API (SPEC section 2) and state-dict loading that keeps EMA precision and fails cleanly."""

from __future__ import annotations

import copy
import operator
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _deepspeed, _sharded
from . import _validation as V
from ._state import StateMap, counting
from .backends import BACKEND_NAMES, Backend, Bucket, ReferenceBackend, resolve_backend

# Per-parameter LLaCA state. "alpha" holds the last balance weight, or -1 before the first LLaCA
# step of the tensor (the "fresh" mark the kernels read, see _ops.py). "ema_pending" exists only
# for tensors of a backend that defers the blend: set on the device while the EMA lacks the blend
# of the last step (see flush_ema); state dicts never hold it, since they are taken after a flush.
# The key lists and the slots' dtypes live in _validation.py, whose checks read them too.
LLACA_STATE_KEYS = V.LLACA_STATE_KEYS
# State entries shaped like their parameter: a state dict must match them to load.
SHAPED_STATE_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "ema", "prev_grad", V.LIVE_PARAM)

_REFERENCE = ReferenceBackend()


def _as_is(t: Tensor) -> Tensor:
    return t


def _capturing(t: Tensor) -> bool:
    """Whether a CUDA graph capture is under way on ``t``'s device's current stream."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def eager_under_compile(fn):
    """``torch.compiler.disable`` with the reason that dynamo shows (NOTE [torch.compile])."""
    reason = ("llaca_optim runs its optimizer step eagerly under torch.compile (one fused op per "
              "bucket: nothing to compile); with fullgraph=True, call optimizer.step() outside "
              "the compiled function")
    try:
        return torch.compiler.disable(fn, reason=reason)
    except TypeError:  # torch before 2.6 takes no reason
        return torch.compiler.disable(fn)


@dataclass
class _GroupPlan:
    """A param group's buckets from the last full planning, and what they assumed."""

    params: list[Tensor]             # a copy of the group's params list (replaced or edited)
    options: tuple[Any, ...]         # group options that change which state exists
    has_grad: list[bool]
    grad_layouts: list[tuple[Any, ...]]  # (shape, dtype, device, stride) of each gradient
    buckets: list[tuple[Backend, Bucket, list[int]]]


@dataclass
class LLaCAAlphas:
    """The last step's balance weights, one per parameter that has LLaCA state, in param-group
    order. ``alphas`` and ``fell_back`` are tensors on the parameters' device: reading them does
    not synchronise with the host until you print or ``.item()`` them. A negative alpha means
    the parameter has had no LLaCA step yet."""

    params: list[Tensor]
    alphas: Tensor
    fell_back: Tensor


class LLaCAOptimizerBase(Optimizer):
    """Shared machinery; subclasses implement ``_llaca_state``, ``_run_groups`` and
    ``_reset_for_new_task``."""

    def _setup_backend(self, backend: str | Backend) -> None:
        if not isinstance(backend, Backend) and backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(
                f"llaca_optim: unknown backend {backend!r}; choose one of "
                f"{('auto',) + BACKEND_NAMES} (see llaca_optim.available_backends())"
            )
        self._requested_backend = backend
        self._backends: dict[str, Backend] = {}
        self._ema_swap: list[tuple[Tensor, Tensor, Tensor | None]] | None = None
        self.state = counting(self.state)  # see _state.py
        self._invalidate_plans()
        self._given_params = _deepspeed.GivenParams()
        for group in self.param_groups:
            self._given_params.add(group["params"])
            for p in group["params"]:
                self._backend_for(p.device.type)

    def _backend_for(self, device_type: str) -> Backend:
        backend = self._backends.get(device_type)
        if backend is None:
            backend = self._backends[device_type] = resolve_backend(self._requested_backend, device_type)
        return backend

    @property
    def backend(self) -> str | dict[str, str]:
        """The backend each device's parameters use: a name, or ``{device_type: name}``."""
        names = {device: backend.name for device, backend in self._backends.items()}
        if len(names) == 1:
            return next(iter(names.values()))
        return names

    # Pickling and copy.deepcopy: torch's Optimizer keeps only defaults, state and param_groups,
    # so the backend choice travels too and the backends are resolved again on arrival; blends
    # are applied first, so the EMAs that travel are up to date.
    def __getstate__(self) -> dict[str, Any]:
        self._check_not_swapped("pickle or copy the optimizer")  # a copy would not know to swap back
        self.flush_ema()
        state = super().__getstate__()
        state["_requested_backend"] = self._requested_backend
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # torch's load_state_dict also ends here, with a plain defaultdict as the state.
        super().__setstate__(state)
        self.state = counting(self.state)
        if not hasattr(self, "_backends"):  # unpickled
            self._setup_backend(self._requested_backend)
        self._invalidate_plans()

    # ------------------------------------------------------------------ param groups

    def _validate_group(self, group: dict[str, Any], where: str) -> tuple[float, float]:
        return V.resolve_llaca_knobs(group, where)

    def _add_group_checked(self, add: Any, param_group: dict[str, Any]) -> None:
        """Adds a group through ``add`` and validates it; on error the group is removed again."""
        with warnings.catch_warnings():
            # torch warns of a parameter listed twice and keeps it; we refuse it just below.
            warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
            add(param_group)
        self._invalidate_plans()
        index = len(self.param_groups) - 1
        try:
            V.check_each_param_once(self.param_groups)
            self._validate_group(self.param_groups[index], f"param_groups[{index}]")
            if hasattr(self, "_backends"):
                for p in self.param_groups[index]["params"]:
                    self._backend_for(p.device.type)
        except Exception:
            self.param_groups.pop()
            raise
        if hasattr(self, "_given_params"):
            self._given_params.add(self.param_groups[index]["params"])

    # ------------------------------------------------------------------ one step

    def _check_not_swapped(self, action: str) -> None:
        if self._ema_swap is not None:
            raise RuntimeError(
                f"llaca_optim: cannot {action} while the EMA weights are swapped in; leave the "
                "`with optimizer.ema_weights():` block first"
            )

    # A step's work is planned per param group: which parameters have gradients, which backend
    # takes each, and the per-(backend, device, dtype) buckets of tensors handed to the kernels.
    # Planning validates every gradient and looks at every state tensor, which costs microseconds
    # per parameter in Python: more than the kernel itself for thousands of small tensors. So a
    # plan is kept and reused while nothing it depends on changes; each step then only checks that
    # the same parameters have gradients with the same shape, dtype, device and strides (one
    # comparison per gradient) and puts this step's gradients into the buckets. Anything else
    # (a parameter without a gradient this time, a gradient of another layout, new groups, a new
    # task, a loaded state dict, any change to ``self.state`` or its entries, which _state.py
    # makes countable) plans again from scratch, with the full checks.

    def _invalidate_plans(self) -> None:
        self._plans: dict[int, _GroupPlan] = {}
        self._planned_state: tuple[StateMap, int] | None = None

    def _state_changed(self) -> bool:
        """Whether ``self.state`` was replaced or changed since the plans were made."""
        planned = self._planned_state
        return planned is None or self.state is not planned[0] or planned[0].changes != planned[1]

    def _group_options(self, group: dict[str, Any]) -> tuple[Any, ...]:
        return (group.get("llaca"), group.get("amsgrad"), group.get("ema_dtype"),
                group.get("defer_blend"))

    def _reuse_plan(self, gi: int, group: dict[str, Any]) -> list[tuple[Backend, Bucket]] | None:
        plan = self._plans.get(gi)
        params = group["params"]
        if plan is None or plan.options != self._group_options(group):
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
            if bucket.sources is None:
                bucket.grads = [present[i] for i in positions]
                continue
            # FSDP may swap a parameter's local tensor (lazy init, reloads): plan again then.
            if any(_sharded.local(p) is not q for p, q in zip(bucket.sources, bucket.params)):
                return None
            bucket.grads = [_sharded.local(present[i]) for i in positions]
        return [(backend, bucket) for backend, bucket, _ in plan.buckets]

    # Whether this optimizer's own state holds AdamW's entries (LLaCAAdamW) or only LLaCA's.
    _holds_adamw_state = False

    def _validated_pairs(self, gi: int, group: dict[str, Any]) -> list[tuple[Tensor, Tensor]]:
        pairs = []
        for pi, p in enumerate(group["params"]):
            if p.grad is None:
                continue
            label = V.param_label(group, gi, pi)
            V.check_gradient(p, p.grad, label)
            if p in self.state:  # what the user may have put there (see _state.py)
                V.check_state(p, self.state[p], label, adamw=self._holds_adamw_state,
                              llaca=bool(group["llaca"]))
            pairs.append((p, p.grad))
        return pairs

    def _build_buckets(self, group: dict[str, Any], pairs: list[tuple[Tensor, Tensor]]
                       ) -> list[tuple[Backend, Bucket, list[int]]]:
        """Initialises missing state and sorts ``pairs`` into buckets; returns each bucket with
        the positions in ``pairs`` of its tensors. Subclasses fill their own lists."""
        raise NotImplementedError

    # NOTE [torch.compile] Under torch.compile (of `optimizer.step`, or of a training step that
    # calls it) our step runs eagerly: the plan, the kernels' launches and the deferred-blend
    # bookkeeping are excluded from tracing (eager_under_compile), so dynamo breaks the graph
    # there and the step gives the eager step's bits; fullgraph=True therefore refuses a region
    # that contains the step, saying why. There is nothing for the compiler to fuse (each bucket
    # is one op already), and tracing it cost: the op was functionalized, and a compiled step
    # measured 1.6x the eager one on the CPU (it copied every parameter, a model's worth of
    # allocation per step); torch.compile also dropped the step's writes to the optimizer's own
    # attributes, so a deferred blend was never flushed and the EMA read after it was stale.
    # tests/test_torch_compile.py holds compiled steps to the eager bits.
    @eager_under_compile
    def _plan_step(self) -> list[tuple[dict[str, Any], list[tuple[Backend, Bucket]], float, float]]:
        """Every (group, buckets, scale, base_weight) of this step. All groups are validated
        before any state is created or any tensor touched (SPEC section 6)."""
        if not hasattr(self, "_plans"):
            self._invalidate_plans()
        state_changed = self._state_changed()
        if state_changed:
            self.state = counting(self.state)  # adopts a map or entries the user put in
            self._invalidate_plans()
        self._complete_groups()
        plans: list[list[Any]] = []
        to_build = []
        for gi, group in enumerate(self.param_groups):
            scale, base_weight = self._validate_group(group, f"param_groups[{gi}]")
            buckets = self._reuse_plan(gi, group)
            if buckets is None:
                to_build.append((len(plans), gi, group, self._validated_pairs(gi, group)))
            plans.append([group, buckets, scale, base_weight])
        if to_build:
            self._check_step_tensors(with_state=state_changed)
        self._flush_before_replan: list[Tensor] = []
        for index, gi, group, pairs in to_build:
            built = self._build_buckets(group, pairs)
            self._plans[gi] = _GroupPlan(
                params=list(group["params"]), options=self._group_options(group),
                has_grad=[p.grad is not None for p in group["params"]],
                grad_layouts=[(g.shape, g.dtype, g.device, g.stride()) for _, g in pairs],
                buckets=built,
            )
            plans[index][1] = [(backend, bucket) for backend, bucket, _ in built]
        if self._flush_before_replan:
            # Tensors with a blend pending whose new route blends within the step (another
            # backend, or defer_blend turned off): apply it now, before that step runs.
            self._flush([(p, self._llaca_state(p)) for p in self._flush_before_replan], drop=True)
        self._planned_state = (self.state, self.state.changes)  # after planning's own changes
        return [tuple(p) for p in plans]  # type: ignore[misc]

    def _complete_groups(self) -> None:
        """Fills what a group added behind the optimizer's back lacks (the wrapper's)."""

    def _check_step_tensors(self, with_state: bool) -> None:
        """Checks across all groups, made whenever a group is planned anew, before any state is
        made: a step over DeepSpeed's flat partitions is refused (``_deepspeed.py``); each
        parameter stands once; no tensor the step writes shares memory with another one it
        touches (the fused kernels would race on it, threads updating one tensor twice). The
        state tensors are among those compared ``with_state``: when the state was loaded or
        edited since the last planning. Otherwise they are those checked then, or made by the
        optimizer since (each in memory of its own), and only parameters and gradients are
        compared: a third of the work, for the re-planning of steps whose gradients come and go."""
        stepped = [(gi, pi, group, p) for gi, group in enumerate(self.param_groups)
                   for pi, p in enumerate(group["params"]) if p.grad is not None]
        kind = self._given_params.partitioning(p for _, _, _, p in stepped)
        if kind is not None:
            raise RuntimeError(_deepspeed.refusal(type(self).__name__, kind))
        V.check_each_param_once(self.param_groups)
        local = _sharded.local if _sharded.any_sharded() else _as_is
        items = []
        for owner, (_, _, _, p) in enumerate(stepped):
            items.append((local(p), "the parameter", owner, True))
            items.append((local(p.grad), "its gradient", owner, False))
            for key, value in (self.state.get(p, {}) if with_state else {}).items():
                if isinstance(value, Tensor):
                    items.append((local(value), f"optimizer.state[param][{key!r}]", owner, True))

        def describe(owner: int) -> str:
            gi, pi, group, _ = stepped[owner]
            return V.param_label(group, gi, pi)

        V.check_no_shared_memory(items, describe)

    def _init_llaca_state(self, p: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        if "ema" in state:
            return
        # The EMA starts as a copy of p; the first real step overwrites it with the stepped p. If
        # that step is skipped (AMP overflow) the EMA is still a faithful copy of the weights.
        state["ema"] = p.detach().to(V.ema_dtype_for(p, group["ema_dtype"]), copy=True)
        state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["alpha"] = torch.full((), -1.0, dtype=torch.float32, device=p.device)
        state["alpha_fell_back"] = torch.zeros((), dtype=torch.bool, device=p.device)

    @staticmethod
    def _add_llaca(bucket: Bucket, state: dict[str, Any], view: Any) -> None:
        bucket.emas.append(view(state["ema"]))
        bucket.prev_grads.append(view(state["prev_grad"]))
        bucket.alphas.append(state["alpha"])
        bucket.fell_back.append(state["alpha_fell_back"])

    def _pick(self, p: Tensor, companions: list[Tensor]) -> Backend:
        """The group's backend when its kernels take this tensor, else the reference (float64,
        layouts with gaps): never a contiguous copy updated in place of the real tensor."""
        backend = self._backend_for(p.device.type)
        return backend if backend.accepts(p, companions) else _REFERENCE

    def _route(self, p: Tensor, companions: list[Tensor]) -> tuple[Backend, Any]:
        """The backend of ``p`` and, for a DTensor whose local shards it takes, the shards'
        layout (a ShardLayout: the bucket then holds local shards, NOTE [sharded parameters]).
        Other DTensors go to the reference backend whole."""
        if not _sharded.is_sharded(p):
            return self._pick(p, companions), None
        layout = _sharded.layout_of(p, companions)
        if layout is not None:
            backend = self._pick(_sharded.local(p), [_sharded.local(t) for t in companions])
            if backend.runs_on_shards:
                return backend, layout
        return _REFERENCE, None

    def _place(self, buckets: dict[tuple[Any, ...], tuple[Backend, Bucket, list[int]]],
               position: int, p: Tensor, g: Tensor, companions: list[Tensor], ema_dtype: Any
               ) -> tuple[Backend, Bucket, Any]:
        """Routes ``p`` (with its gradient and state ``companions``), adds it and ``g`` to its
        bucket, opened on first use; returns the backend, the bucket and the view that turns
        ``p``'s state tensors into what the bucket holds (local shards of DTensors)."""
        backend, layout = self._route(p, [g, *companions])
        key = (backend.name, p.device, p.dtype, ema_dtype, layout)
        _, bucket, positions = buckets.setdefault(
            key, (backend, Bucket(sources=[] if layout is not None else None), []))
        positions.append(position)
        view = _as_is
        if layout is not None:
            view = _sharded.local
            bucket.sources.append(p)
        bucket.params.append(view(p))
        bucket.grads.append(view(g))
        return backend, bucket, view

    def _finish_buckets(self, buckets: dict[tuple[Any, ...], tuple[Backend, Bucket, list[int]]],
                        llaca: bool) -> list[tuple[Backend, Bucket, list[int]]]:
        """Gives the sharded buckets of a group with LLaCA on their cross-shard reduction (a
        DTensor replicated on every mesh dimension needs none: each rank holds the whole tensor
        and computes the same alpha as the others), and takes the deferred-blend flags away from
        buckets whose kernels would never defer (every tensor small enough to finish in one
        visit): one list less to pass and check at every step."""
        for key, (backend, bucket, _) in buckets.items():
            layout = key[-1]  # see _place
            if layout is not None and layout.sum_dims and llaca:
                bucket.shard = _sharded.ShardReduce(layout, len(bucket.params),
                                                    bucket.params[0].device)
            if bucket.ema_pending and bucket.shard is None and not backend.may_defer(bucket.params):
                # Their flags leave the state, after any blend still pending is applied.
                self._flush_before_replan.extend(bucket.sources or bucket.params)
                bucket.ema_pending = []
        return list(buckets.values())

    # ------------------------------------------------------------------ deferred blend

    # NOTE [deferred blend, Python side] A backend with ``defers_blend`` (CUDA) may leave the EMA
    # blend of a step pending until the tensor's next step, which then costs one pass over memory
    # instead of two (csrc/cuda/layout.h has the kernel side). While a blend is pending the EMA
    # in ``state`` lags one blend behind, so everything that reads EMAs flushes first; the
    # flags are device tensors, so neither deferring nor flushing synchronises with the host.
    # ``_blend_pending`` is the host's conservative view (a deferring step ran since the last
    # flush), which keeps flush_ema free when nothing can be pending. A step captured in a CUDA
    # graph defers at every replay, unseen by Python: once one was captured, every flush runs.

    def _may_be_pending(self) -> bool:
        return getattr(self, "_blend_pending", False) or getattr(self, "_deferral_captured", False)

    def flush_ema(self) -> None:
        """Applies any EMA blend the backend deferred (see ``defer_blend``), so that every EMA in
        ``state`` is up to date. Cheap when nothing is pending; never synchronises with the host.
        ``ema``, ``ema_weights``, ``end_task`` and ``state_dict`` call it themselves."""
        if self._may_be_pending():
            self._flush(list(self._llaca_params()), drop=False)
            self._blend_pending = False

    @torch.no_grad()
    def _flush(self, entries: list[tuple[Tensor, dict[str, Any] | None]], drop: bool) -> None:
        """Flushes the pending blends of ``entries`` through the backend that deferred them, one
        call per (device, dtype, EMA dtype); ``drop`` also removes their flags from the state."""
        buckets: dict[tuple[Any, ...], Bucket] = {}
        for p, state in entries:
            if state is None or "ema_pending" not in state:
                continue
            bucket = buckets.setdefault((p.device, p.dtype, state["ema"].dtype), Bucket())
            bucket.params.append(_sharded.local(p))
            bucket.emas.append(_sharded.local(state["ema"]))
            bucket.alphas.append(state["alpha"])
            bucket.ema_pending.append(state.pop("ema_pending") if drop else state["ema_pending"])
        for (device, _, _), bucket in buckets.items():
            self._backend_for(device.type).flush_ema(bucket)

    def _before_deferred_step(self, bucket: Bucket) -> None:
        """Marks blends as pending, and warns (once) if a parameter whose blend is pending was
        changed in place since its last step: the blend then uses the changed values. A step of
        ours does not bump ``_version`` (the kernels write through the op), so any change is the
        user's."""
        if bucket.params and _capturing(bucket.params[0]):
            self._deferral_captured = True
        versions = [p._version for p in bucket.params]
        if (getattr(self, "_blend_pending", False) and bucket.param_versions is not None
                and versions != bucket.param_versions and not getattr(self, "_warned_inplace", False)):
            self._warned_inplace = True
            warnings.warn(
                "llaca_optim: parameters were changed in place since the last optimizer step, "
                "while that step's EMA blend was deferred to this one (defer_blend=True); the "
                "blend used the changed values. Call optimizer.flush_ema() before changing "
                "parameters between steps, or build the optimizer with defer_blend=False.",
                RuntimeWarning,
                stacklevel=3,
            )
        bucket.param_versions = versions
        self._blend_pending = True

    # ------------------------------------------------------------------ task API

    def _llaca_state(self, p: Tensor) -> dict[str, Any] | None:
        raise NotImplementedError

    def _llaca_params(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        for group in self.param_groups:
            for p in group["params"]:
                state = self._llaca_state(p)
                if state is not None and "ema" in state:
                    yield p, state

    def ema(self, param: Tensor) -> Tensor | None:
        """The EMA of ``param`` (the tensor itself, not a copy), or None before its first step.
        Inside :meth:`ema_weights` a same-dtype EMA lives in the parameter itself, which is then
        what this returns."""
        state = self._llaca_state(param)
        if state is None or "ema" not in state:
            return None
        if self._may_be_pending():  # this parameter's blend only: ema(p) is often called per p
            self._flush([(param, state)], drop=False)
        if self._ema_swap is not None and any(p is param and backup is None for p, _, backup in self._ema_swap):
            return param
        return state["ema"]

    def alphas(self) -> LLaCAAlphas:
        """The last step's alphas and fallback flags, without a host synchronisation."""
        params, alphas, fell_back = [], [], []
        for p, state in self._llaca_params():
            params.append(p)
            alphas.append(state["alpha"])
            fell_back.append(state["alpha_fell_back"])
        if not params:
            return LLaCAAlphas([], torch.empty(0), torch.empty(0, dtype=torch.bool))
        device = alphas[0].device
        return LLaCAAlphas(
            params,
            torch.stack([a.to(device, non_blocking=True) for a in alphas]),
            torch.stack([f.to(device, non_blocking=True) for f in fell_back]),
        )

    @contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Evaluate with the EMA weights: swaps them into the parameters in place and restores the
        live weights bit-exactly on exit (also when the block raises).

        Same-dtype EMAs are swapped through a one-tensor temporary; an fp32 EMA of a 16-bit
        parameter cannot hold the live weights, so those parameters are backed up in their own
        dtype for the duration of the block."""
        self._check_not_swapped("swap the EMA weights in again")
        self.flush_ema()
        swapped: list[tuple[Tensor, Tensor, Tensor | None]] = []
        with torch.no_grad():
            for p, state in self._llaca_params():
                ema = state["ema"]
                if ema.dtype == p.dtype:
                    live = p.detach().clone()
                    p.copy_(ema)
                    ema.copy_(live)
                    swapped.append((p, ema, None))
                else:
                    backup = p.detach().clone()
                    p.copy_(ema)
                    swapped.append((p, ema, backup))
        self._ema_swap = swapped
        try:
            yield
        finally:
            with torch.no_grad():
                for p, ema, backup in swapped:
                    if backup is None:
                        averaged = p.detach().clone()
                        p.copy_(ema)
                        ema.copy_(averaged)
                    else:
                        p.copy_(backup)
            self._ema_swap = None

    def end_task(self, keep_moments: bool = False) -> None:
        """Ends a task: copies every EMA into its parameter, then returns the optimizer to the
        state of a freshly built one (no EMA, previous gradient, moments or step counts), as the
        published recipe does by starting a new run per task. ``keep_moments=True`` keeps the
        inner optimizer's moments and step counts and drops only the LLaCA state."""
        self._check_not_swapped("end the task")
        self.flush_ema()
        with torch.no_grad():
            for p, state in self._llaca_params():
                p.copy_(state["ema"])
        self._reset_for_new_task(keep_moments)
        self._invalidate_plans()

    def _reset_for_new_task(self, keep_moments: bool) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ state dicts

    # NOTE [state dicts inside the EMA swap] Inside `with optimizer.ema_weights():` each
    # parameter holds its EMA, and a same-dtype EMA's slot in `state` holds the live weights. A
    # checkpoint is often saved there: the Hugging Face Trainer saves after evaluating, and one
    # that evaluates the EMA may save with it swapped in, the model's file then holding the EMA
    # weights (what one deploys). Such a state dict still holds the true state: the EMA under
    # "ema", and the live weights, which the state belongs to and the model's file no longer
    # holds, under "live_param". Loading it puts them back into the parameters, after the model's
    # own weights were loaded (the Trainer, torch.distributed.checkpoint and the usual
    # model-then-optimizer order all do so); training then resumes bit for bit, as from a
    # checkpoint saved outside the block. A state dict taken outside the block has no
    # "live_param", and loading it leaves the parameters alone.

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, taken after :meth:`flush_ema` (so every EMA is up to date) and
        without the deferred-blend flags. Its entries are plain dicts holding the state tensors
        themselves (ours count their changes, see _state.py, and ``torch.load`` with
        ``weights_only=True`` admits no dict subclass). Taken inside :meth:`ema_weights`, it
        holds copies of the true EMAs and of the live weights (NOTE [state dicts inside the EMA
        swap])."""
        self.flush_ema()
        saved = super().state_dict()
        saved["state"] = {
            pid: {k: v for k, v in entry.items() if k != "ema_pending"}
            for pid, entry in saved["state"].items()
        }
        if self._ema_swap is not None:
            ids = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            with torch.no_grad():
                for p, ema, backup in self._ema_swap:
                    entry = saved["state"][ids[id(p)]]
                    if backup is None:  # p holds the EMA, the EMA's slot the live weights
                        entry["ema"], entry[V.LIVE_PARAM] = p.detach().clone(), ema.clone()
                    else:  # the EMA is in place; p holds it rounded, backup the live weights
                        entry[V.LIVE_PARAM] = backup.clone()
        return saved

    def _check_layout(self, state_dict: dict[str, Any], owner: str) -> dict[int, Tensor]:
        """Raises unless ``state_dict`` was saved from the same parameter layout; returns the map
        from saved parameter ids to this optimizer's parameters."""
        saved_groups = state_dict.get("param_groups")
        saved_state = state_dict.get("state")
        if not isinstance(saved_groups, list) or not isinstance(saved_state, dict):
            raise ValueError(f"llaca_optim: not an optimizer state dict ({owner}): it needs 'state' and 'param_groups'")
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"llaca_optim: the state dict ({owner}) has {len(saved_groups)} param groups but "
                f"this optimizer has {len(self.param_groups)}; load it into an optimizer built "
                "over the same parameters in the same groups and order"
            )
        id_map: dict[int, Tensor] = {}
        labels: dict[int, str] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"llaca_optim: param_groups[{gi}] of the state dict ({owner}) has "
                    f"{len(saved['params'])} parameters but this optimizer's has "
                    f"{len(group['params'])}; build the optimizer over the same parameters"
                )
            id_map.update(zip(saved["params"], group["params"]))
            labels.update((pid, V.param_label(group, gi, pi)) for pi, pid in enumerate(saved["params"]))
        for pid, entry in saved_state.items():
            if pid not in id_map:
                raise ValueError(f"llaca_optim: the state dict ({owner}) has state for unknown parameter id {pid!r}")
            if not isinstance(entry, dict):
                raise ValueError(
                    f"llaca_optim: state_dict['state'][{pid!r}] of the state dict ({owner}), for "
                    f"{labels[pid]}, is a {type(entry).__name__}, not a dict of state tensors; fix "
                    "or drop it before loading; nothing was loaded")
            p = id_map[pid]
            for key in SHAPED_STATE_KEYS:
                value = entry.get(key)
                if isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"llaca_optim: the state dict ({owner}) holds {key} of shape "
                        f"{tuple(value.shape)} for {labels[pid]} of shape {tuple(p.shape)} "
                        f"(saved id {pid}); it was saved from a different model layout, or its "
                        "entries were mixed up; nothing was loaded"
                    )
                p_sharded = _sharded.is_sharded(p)
                if isinstance(value, Tensor) and _sharded.is_sharded(value) != p_sharded:
                    sharded, plain = ("parameter", key) if p_sharded else (key, "parameter")
                    raise ValueError(
                        f"llaca_optim: the state dict ({owner}) holds {key} as a "
                        f"{'plain tensor' if p_sharded else 'DTensor'} for a "
                        f"{'sharded (DTensor)' if p_sharded else 'plain'} parameter "
                        f"(saved id {pid}): the {sharded} is sharded and the {plain} is not. Load "
                        "state dicts of sharded models with torch.distributed.checkpoint "
                        "(get_state_dict / set_state_dict), which shard them to match"
                    )
        return id_map

    def _restore_llaca_entries(self, state_dict: dict[str, Any], id_map: dict[int, Tensor],
                               target: dict[Tensor, dict[str, Any]]) -> dict[Tensor, Tensor]:
        """torch's loader casts every floating state tensor to its parameter's dtype; put the
        LLaCA entries and the step counters back in their own dtypes, on the parameter's device
        (a counter saved as a number, as torch's optimizers once saved ``step``, becomes a
        tensor). Takes the live weights of a state dict saved inside ``ema_weights()`` out of
        the state and returns them by parameter (NOTE [state dicts inside the EMA swap])."""
        group_of = {p: group for group in self.param_groups for p in group["params"]}
        live: dict[Tensor, Tensor] = {}
        for pid, entry in state_dict["state"].items():
            p = id_map[pid]
            state = target[p]
            if V.LIVE_PARAM in state:
                live[p] = state.pop(V.LIVE_PARAM)
                if not isinstance(live[p], Tensor):
                    raise ValueError(
                        f"llaca_optim: state_dict['state'][{pid!r}][{V.LIVE_PARAM!r}] of the state "
                        f"dict is a {type(live[p]).__name__}, not the parameter's live weights; "
                        "fix or drop it before loading; nothing was loaded")
            for key, value in entry.items():
                if key in V.SLOT_DTYPES and isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = torch.tensor(float(value))
                if not isinstance(value, Tensor):
                    continue
                if key == "ema":
                    dtype = V.ema_dtype_for(p, group_of[p]["ema_dtype"])
                elif key in V.SLOT_DTYPES:
                    dtype = V.SLOT_DTYPES[key]
                else:
                    continue
                state[key] = value.to(device=p.device, dtype=dtype)  # value is our deep copy
        return live

    def _check_loaded(self, state_dict: dict[str, Any], id_map: dict[int, Tensor], owner: str,
                      group_keys: tuple[str, ...]) -> None:
        """Checks what a load put in place, as the next step would read it: every group (its
        options, ``group_keys`` among them) and every state entry. Raises naming the group or the
        parameter and its saved id; the caller then puts the old state back."""
        for gi, group in enumerate(self.param_groups):
            where = f"param_groups[{gi}] of the state dict ({owner})"
            V.check_group_keys(group, group_keys, where)
            self._validate_group(group, where)
        labels = {id(p): V.param_label(group, gi, pi) for gi, group in enumerate(self.param_groups)
                  for pi, p in enumerate(group["params"])}
        llaca_of = {id(p): bool(group["llaca"]) for group in self.param_groups for p in group["params"]}
        for pid in state_dict["state"]:
            p = id_map[pid]
            V.check_state(p, self.state[p], labels[id(p)], adamw=self._holds_adamw_state,
                          llaca=llaca_of[id(p)], source=V.loaded_state(owner, pid))

    @contextmanager
    def _restored_on_error(self, *optimizers: Optimizer) -> Iterator[None]:
        """Puts the state and groups of ``optimizers`` back if the block raises. torch's
        ``load_state_dict`` builds new ``state`` and ``param_groups`` objects rather than changing
        the old ones, so keeping the old objects is keeping what they held."""
        kept = [(o, o.state, o.param_groups) for o in optimizers]
        try:
            yield
        except BaseException:
            for o, state, groups in kept:
                o.state, o.param_groups = state, groups
            self._invalidate_plans()
            raise

    @staticmethod
    @torch.no_grad()
    def _put_back_live_weights(live: dict[Tensor, Tensor]) -> None:
        for p, value in live.items():
            p.copy_(value)

    @staticmethod
    def _copy_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
        # Loading must not alias the caller's tensors: later steps would write into them.
        return copy.deepcopy(state_dict)

    def __repr__(self) -> str:
        text = super().__repr__()
        return text.replace("(", f"(backend: {self._backends and self.backend or self._requested_backend}\n", 1)

