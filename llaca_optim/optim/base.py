"""What LLaCAAdamW and the LLaCA wrapper share: param groups, backend choice, pickling, the task
API (docs/spec.md section 2) and state-dict loading that keeps EMA precision and fails cleanly.
A step's planning is the step planner's (plan.py); blends left pending are deferred.py's."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..ops.registry import Backend, BackendChoice, is_dtensor
from ..ops.roles import (ADAMW_LLACA, BY_STATE_KEY, LLACA_STATE_KEYS, SLOT_DTYPES,
                         UNSAVED_STATE_KEYS)
from ..ops.roles import SHAPED_STATE_KEYS
from ..presets import Preset
from ..state import counting
from . import sharded, stale, telemetry, zero
from . import validation
from .deferred import PendingBlends
from .plan import PlannedGroup, StepPlanner

# State entries shaped like their parameter (and the live weights a state dict taken inside the
# EMA swap holds): a state dict must match them to load.
LOADED_SHAPED_KEYS = (*SHAPED_STATE_KEYS, validation.LIVE_PARAM)


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
class LLaCAAlphas:
    """The last step's balance weights, one per parameter that has LLaCA state, in param-group
    order. ``alphas`` and ``fell_back`` are tensors on the parameters' device: reading them does
    not synchronise with the host until you print or ``.item()`` them. A negative alpha means
    the parameter has had no LLaCA step yet."""

    params: list[Tensor]
    alphas: Tensor
    fell_back: Tensor


class LLaCAOptimizerBase(Optimizer):
    """Shared machinery. A subclass declares what it steps (``_op`` and ``_parts``, for the step
    planner) and implements ``_reset_for_new_task``; its ``step`` plans (``_plan_step``) and
    runs the plan (``plan.run_step``)."""

    def _setup_backend(self, backend: str | Backend) -> None:
        """Everything beside torch's own attributes; also what unpickling rebuilds."""
        self._requested_backend = backend
        self._backends = BackendChoice(backend)
        self._ema_swap: list[tuple[Tensor, Tensor, Tensor | None]] | None = None
        self.state = counting(self.state)  # see state.py
        self._zero = zero.ZeroPartitions()
        self._pending = PendingBlends(self._backends)
        self._task_steps = 0  # steps since the last end_task (telemetry.py)
        self._warned: set[str] = set()
        self._planner = StepPlanner(
            op=self._op, backends=self._backends, zero=self._zero,
            pending=self._pending, owner=type(self).__name__)
        for group in self.param_groups:
            self._zero.add(group)
            for p in group["params"]:
                self._backends(p.device.type)  # an unknown or unavailable backend fails here

    @property
    def backend(self) -> str | dict[str, str]:
        """The backend each device's parameters use: a name, or ``{device_type: name}``."""
        names = {device: backend.name for device, backend in self._backends.by_device.items()}
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

    def _validate_group(self, group: dict[str, Any], where: str) -> Preset:
        return validation.resolve_llaca_knobs(group, where)

    def _add_group_checked(self, add: Any, param_group: dict[str, Any]) -> None:
        """Adds a group through ``add`` and validates it; on error the group is removed again."""
        with warnings.catch_warnings():
            # torch warns of a parameter listed twice and keeps it; we refuse it just below.
            warnings.filterwarnings("ignore", message=".*duplicate parameters.*")
            add(param_group)
        self._invalidate_plans()
        index = len(self.param_groups) - 1
        try:
            validation.check_each_param_once(self.param_groups)
            self._validate_group(self.param_groups[index], f"param_groups[{index}]")
            if hasattr(self, "_backends"):
                for p in self.param_groups[index]["params"]:
                    self._backends(p.device.type)
        except Exception:
            self.param_groups.pop()
            raise
        if hasattr(self, "_zero"):
            self._zero.add(self.param_groups[index])

    # ------------------------------------------------------------------ one step

    def _check_not_swapped(self, action: str) -> None:
        if self._ema_swap is not None:
            raise RuntimeError(
                f"llaca_optim: cannot {action} while the EMA weights are swapped in; leave the "
                "`with optimizer.ema_weights():` block first"
            )

    def _invalidate_plans(self) -> None:
        planner = self.__dict__.get("_planner")
        if planner is not None:
            planner.invalidate()

    # What a subclass steps: the op its buckets go to, and the parts of the role table a group
    # has on (ops/roles.py; None: the group is not stepped here).
    _op: str

    def _parts(self, group: dict[str, Any]) -> frozenset[str] | None:
        raise NotImplementedError

    @staticmethod
    def _llaca_parts(group: dict[str, Any]) -> set[str]:
        """The parts of a group's LLaCA update: the EMA state, and the horizon's statistic when
        the group sets its level with ``horizon`` (both optimizers)."""
        return {"llaca", "horizon"} if group.get("horizon") is not None else {"llaca"}

    # NOTE [torch.compile] Under torch.compile (of `optimizer.step`, or of a training step that
    # calls it) our step runs eagerly: the plan, the kernels' launches and the deferred-blend
    # bookkeeping are excluded from tracing (eager_under_compile), so dynamo breaks the graph
    # there and the step gives the eager step's bits; fullgraph=True therefore refuses a region
    # that contains the step, saying why. There is nothing for the compiler to fuse (each bucket
    # is one op already), and tracing it costs: the op is functionalized, which copies every
    # parameter (a model's worth of allocation per step), and torch.compile drops the step's
    # writes to the optimizer's own attributes, so a deferred blend would never be flushed.
    # tests/optim/test_torch_compile.py holds compiled steps to the eager bits.
    @eager_under_compile
    def _plan_step(self) -> list[PlannedGroup]:
        """Every (group, buckets, balance weight) of this step (plan.py). All groups are
        validated before the planner makes any state or touches any tensor."""
        self._complete_groups()
        groups = self.param_groups
        declared = [(self._validate_group(group, f"param_groups[{gi}]"), self._parts(group))
                    for gi, group in enumerate(groups)]
        self.state, plan = self._planner.plan(groups, declared, self.state)
        return plan

    def _complete_groups(self) -> None:
        """Fills what a group added behind the optimizer's back lacks (the wrapper's)."""

    # ------------------------------------------------------------------ deferred blend

    def flush_ema(self) -> None:
        """Applies any EMA blend the backend deferred (see ``defer_blend``), so that every EMA in
        ``state`` is up to date. Cheap when nothing is pending; never synchronises with the host.
        ``ema``, ``ema_weights``, ``end_task`` and ``state_dict`` call it themselves."""
        self._pending.flush_all(self._llaca_params())

    # ------------------------------------------------------------------ task API

    def _llaca_state(self, p: Tensor) -> dict[str, Any] | None:
        return self.state.get(p)

    def _llaca_params(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        seen = set()
        for group in self.param_groups:
            for p in group["params"]:
                state = self._llaca_state(p)
                if state is not None and "ema" in state:
                    seen.add(id(p))
                    yield p, state
        # ZeRO stage 3 takes its partitions out of the groups between steps.
        for partition in self._zero.partitions():
            state = self._llaca_state(partition.flat)
            if id(partition.flat) not in seen and state is not None and "ema" in state:
                yield partition.flat, state

    def _zero_states(self) -> Iterator[tuple[zero.ZeroPartition, dict[str, Any]]]:
        """The ZeRO partitions stepped so far, with their state (NOTE [ZeRO partitions])."""
        for partition in self._zero.partitions():
            state = self._llaca_state(partition.flat)
            if state is not None:
                yield partition, state

    def ema_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The EMA of every parameter of ``model`` that has one, whole, by parameter name (a
        copy). Under DeepSpeed ZeRO it gathers each partition's pieces from the ranks (one
        all-reduce per partition): a collective, which every rank must call. Empty before the
        first step."""
        self.flush_ema()
        whole: dict[int, Tensor] = {}
        for partition, state in self._zero_states():
            if "ema" in state:
                for p, ema in zip(partition.rows, zero.full_tensors(partition, state["ema"])):
                    whole[id(p)] = ema
        out = {}
        for name, p in model.named_parameters():
            if id(p) in whole:
                out[name] = whole[id(p)]
            elif not zero.is_zero_param(p):
                ema = self.ema(p)
                if ema is not None:
                    out[name] = ema.detach().clone()
        return out

    def _masters_changed(self, params: list[Tensor]) -> None:
        """DeepSpeed's model weights are copies of the masters we step: refresh them after the
        masters were changed outside a step (collective, on every rank alike)."""
        partitions = [found for found in map(self._zero.get, params) if found is not None]
        if partitions:
            zero.push_masters_to_model(partitions)

    def ema(self, param: Tensor) -> Tensor | None:
        """The EMA of ``param`` (the tensor itself, not a copy), or None before its first step.
        Inside :meth:`ema_weights` a same-dtype EMA lives in the parameter itself, which is then
        what this returns."""
        state = self._llaca_state(param)
        if state is None and zero.is_zero_param(param):
            raise ValueError(
                "llaca_optim: this parameter is partitioned by DeepSpeed ZeRO: its EMA lies in "
                "pieces on the ranks. optimizer.ema_state_dict(model) (or "
                "llaca_optim.integrations.deepspeed.ema_state_dict(model, "
                "optimizer), called on every rank, gathers the EMA of every parameter by name")
        if state is None or "ema" not in state:
            return None
        if self._pending.may_be_pending():  # this parameter's blend only: ema(p) is often called per p
            self._pending.flush([(param, state)], drop=False)
        if self._ema_swap is not None and any(p is param and backup is None for p, _, backup in self._ema_swap):
            return param
        return state["ema"]

    def alphas(self) -> LLaCAAlphas:
        """The last step's alphas and fallback flags, without a host synchronisation."""
        params, alphas, fell_back = [], [], []
        for p, state in self._llaca_params():
            partition = self._zero.get(p)  # a ZeRO partition: a slot element per tensor of it
            params.extend(partition.rows if partition is not None else [p])
            alphas.append(state["alpha"].reshape(-1))
            fell_back.append(state["alpha_fell_back"].reshape(-1))
        if not params:
            return LLaCAAlphas([], torch.empty(0), torch.empty(0, dtype=torch.bool))
        device = alphas[0].device
        return LLaCAAlphas(
            params,
            torch.cat([a.to(device, non_blocking=True) for a in alphas]),
            torch.cat([f.to(device, non_blocking=True) for f in fell_back]),
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
        self._masters_changed([p for p, _, _ in swapped])
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
            self._masters_changed([p for p, _, _ in swapped])
            self._ema_swap = None

    def end_task(self, keep_moments: bool = False) -> None:
        """Ends a task: copies every EMA into its parameter, then returns the optimizer to the
        state of a freshly built one (no EMA, previous gradient, moments or step counts), as the
        published recipe does by starting a new run per task. ``keep_moments=True`` keeps the
        inner optimizer's moments and step counts and drops only the LLaCA state."""
        self._check_not_swapped("end the task")
        self.flush_ema()
        self._say_what_the_alphas_say()
        with torch.no_grad():
            ended = []
            for p, state in self._llaca_params():
                p.copy_(state["ema"])
                ended.append(p)
        self._masters_changed(ended)
        self._reset_for_new_task(keep_moments)
        self._invalidate_plans()

    def _reset_for_new_task(self, keep_moments: bool) -> None:
        raise NotImplementedError

    def _say_what_the_alphas_say(self) -> None:
        """At a task's end: warns, once per optimizer and kind, when the task's balance weights
        show LLaCA as a fixed EMA or as an EMA too slow for the task (telemetry.py)."""
        steps, self._task_steps = self._task_steps, 0
        if steps < telemetry.MIN_STEPS:
            return  # too short to judge: not even a read of the alphas
        found = self.alphas()
        summary = telemetry.summarize(found.alphas, found.fell_back)
        if summary is None:
            return
        for code, message in telemetry.diagnose(*summary, steps, telemetry.uses_horizon(self)):
            if code not in self._warned:
                self._warned.add(code)
                warnings.warn(message, UserWarning, stacklevel=3)

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

    def _step_count(self, p: Tensor) -> Any:
        """The step count of ``p``'s optimizer state that its EMA follows (NOTE [stale EMAs] in
        stale.py), or None where there is none."""
        raise NotImplementedError

    def _mark_ema_steps(self, saved: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        stale.mark([(entry, self._step_count(params[pid])) for pid, entry in saved["state"].items()
                    if "ema" in entry and isinstance(pid, int) and pid < len(params)])

    def _restart_stale_emas(self, state_dict: dict[str, Any], id_map: dict[int, Tensor]) -> list[str]:
        """Takes the EMA marks out of the loaded state and drops the LLaCA state of each
        parameter whose EMA did not follow its steps; returns what to say of each (NOTE [stale
        EMAs] in stale.py)."""
        labels, group_of = self._labels_and_groups()
        loaded = []
        for pid, entry in state_dict["state"].items():
            p = id_map[pid]
            state = self.state.get(p)
            if state is None or stale.KEY not in state:
                continue
            mark = state.pop(stale.KEY)
            if "ema" not in state:
                continue
            saved_ema = entry.get("ema")
            own = validation.ema_dtype_for(p, group_of[id(p)]["ema_dtype"])
            cast = (p.dtype if isinstance(saved_ema, Tensor) and saved_ema.dtype != own
                    and saved_ema.dtype == p.dtype else None)
            loaded.append((p, mark, self._step_count(p), state["ema"], cast))
        found = stale.find(loaded)
        for p, _ in found:
            for key in LLACA_STATE_KEYS:
                self.state[p].pop(key, None)
        return [f"{labels[id(p)]}: {what}" for p, what in found]

    def state_dict(self) -> dict[str, Any]:
        """torch's state dict, taken after :meth:`flush_ema` (so every EMA is up to date) and
        without the deferred-blend flags. Its entries are plain dicts holding the state tensors
        themselves (ours count their changes, see state.py, and ``torch.load`` with
        ``weights_only=True`` admits no dict subclass). Taken inside :meth:`ema_weights`, it
        holds copies of the true EMAs and of the live weights (NOTE [state dicts inside the EMA
        swap])."""
        self.flush_ema()
        saved = super().state_dict()
        saved["state"] = {
            pid: {k: v for k, v in entry.items() if k not in UNSAVED_STATE_KEYS}
            for pid, entry in saved["state"].items()
        }
        if self._ema_swap is not None:
            ids = {id(p): i for i, p in enumerate(p for g in self.param_groups for p in g["params"])}
            with torch.no_grad():
                for p, ema, backup in self._ema_swap:
                    entry = saved["state"][ids[id(p)]]
                    if backup is None:  # p holds the EMA, the EMA's slot the live weights
                        entry["ema"], entry[validation.LIVE_PARAM] = p.detach().clone(), ema.clone()
                    else:  # the EMA is in place; p holds it rounded, backup the live weights
                        entry[validation.LIVE_PARAM] = backup.clone()
        self._mark_ema_steps(saved)
        return saved

    def _labels_and_groups(self) -> tuple[dict[int, str], dict[int, dict[str, Any]]]:
        """Each parameter's label for an error message and its group, by ``id(parameter)``."""
        labels, group_of = {}, {}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                labels[id(p)] = validation.param_label(group, gi, pi)
                group_of[id(p)] = group
        return labels, group_of

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
            labels.update((pid, validation.param_label(group, gi, pi)) for pi, pid in enumerate(saved["params"]))
        for pid, entry in saved_state.items():
            if pid not in id_map:
                raise ValueError(f"llaca_optim: the state dict ({owner}) has state for unknown parameter id {pid!r}")
            if not isinstance(entry, dict):
                raise ValueError(
                    f"llaca_optim: state_dict['state'][{pid!r}] of the state dict ({owner}), for "
                    f"{labels[pid]}, is a {type(entry).__name__}, not a dict of state tensors; fix "
                    "or drop it before loading; nothing was loaded")
            p = id_map[pid]
            for key in LOADED_SHAPED_KEYS:
                value = entry.get(key)
                if isinstance(value, Tensor) and value.shape != p.shape:
                    raise ValueError(
                        f"llaca_optim: the state dict ({owner}) holds {key} of shape "
                        f"{tuple(value.shape)} for {labels[pid]} of shape {tuple(p.shape)} "
                        f"(saved id {pid}); it was saved from a different model layout, or its "
                        "entries were mixed up; nothing was loaded"
                    )
                p_sharded = is_dtensor(p)
                if isinstance(value, Tensor) and is_dtensor(value) != p_sharded:
                    whole, plain = ("parameter", key) if p_sharded else (key, "parameter")
                    raise ValueError(
                        f"llaca_optim: the state dict ({owner}) holds {key} as a "
                        f"{'plain tensor' if p_sharded else 'DTensor'} for a "
                        f"{'sharded (DTensor)' if p_sharded else 'plain'} parameter "
                        f"(saved id {pid}): the {whole} is sharded and the {plain} is not. Load "
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
        _, group_of = self._labels_and_groups()
        live: dict[Tensor, Tensor] = {}
        for pid, entry in state_dict["state"].items():
            p = id_map[pid]
            state = target[p]
            if validation.LIVE_PARAM in state:
                live[p] = state.pop(validation.LIVE_PARAM)
                if not isinstance(live[p], Tensor):
                    raise ValueError(
                        f"llaca_optim: state_dict['state'][{pid!r}][{validation.LIVE_PARAM!r}] of the state "
                        f"dict is a {type(live[p]).__name__}, not the parameter's live weights; "
                        "fix or drop it before loading; nothing was loaded")
            for key, value in entry.items():
                if key in SLOT_DTYPES and isinstance(value, (int, float)) and not isinstance(value, bool):
                    value = torch.tensor(float(value))
                if not isinstance(value, Tensor):
                    continue
                role = BY_STATE_KEY.get(key)
                if role is None or role.dtype == "param":
                    continue  # torch's loader cast it to the parameter's dtype already
                ema_dtype = (validation.ema_dtype_for(p, group_of[id(p)]["ema_dtype"])
                             if role.dtype == "ema" else None)
                dtype = role.dtype_for(p, ema_dtype)
                state[key] = value.to(device=p.device, dtype=dtype)  # value is our deep copy
        return live

    def _check_loaded_groups(self, owner: str, group_keys: tuple[str, ...]) -> None:
        """Checks the groups a load put in place, as the next step would read them (their
        options, ``group_keys`` among them), before anything is read from them. Raises naming
        the group and the key; the caller then puts the old state back."""
        for gi, group in enumerate(self.param_groups):
            where = f"param_groups[{gi}] of the state dict ({owner})"
            validation.check_group_keys(group, group_keys, where)
            self._validate_group(group, where)

    def _check_loaded(self, state_dict: dict[str, Any], id_map: dict[int, Tensor], owner: str) -> None:
        """Checks every state entry a load put in place, as the next step would read it. Raises
        naming the parameter and its saved id; the caller then puts the old state back."""
        labels, group_of = self._labels_and_groups()
        for pid in state_dict["state"]:
            p = id_map[pid]
            partition = self._zero.partition(group_of[id(p)], p)
            validation.check_state(p, self.state[p], labels[id(p)], adamw=self._op == ADAMW_LLACA,
                          llaca=bool(group_of[id(p)]["llaca"]), source=validation.loaded_state(owner, pid),
                          slots=len(partition.rows) if partition else 1)

    def _settle_loaded(self, state_dict: dict[str, Any], id_map: dict[int, Tensor], owner: str,
                       group_keys: tuple[str, ...]) -> tuple[dict[Tensor, Tensor], list[str]]:
        """What both optimizers' loads do once torch's loader put the groups and state in place,
        inside ``_restored_on_error``: check the groups, put the LLaCA entries back in their own
        dtypes, check every entry, and drop the EMAs that did not follow their steps. Returns the
        live weights to put back and what to warn of (NOTE [stale EMAs] in stale.py)."""
        self._check_loaded_groups(owner, group_keys)
        live = self._restore_llaca_entries(state_dict, id_map, self.state)
        self._check_loaded(state_dict, id_map, owner)
        return live, self._restart_stale_emas(state_dict, id_map)

    def _finish_load(self, live: dict[Tensor, Tensor], found: list[str], owner: str) -> None:
        """After a load that succeeded: the warning of stale EMAs, the live weights of a state dict
        saved inside ``ema_weights()``, and a fresh plan."""
        stale.warn(found, owner)
        self._put_back_live_weights(live)
        self._invalidate_plans()

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
        return text.replace("(", f"(backend: {self._backends.by_device and self.backend or self._requested_backend}\n", 1)

