"""EMAs that did not follow their parameters: marks in state dicts, and the check at load.

NOTE [stale EMAs] A state dict of ours may pass through an optimizer that does not keep the EMA:
torch.optim.AdamW loads it, carries the unknown "ema" entries along untouched, trains N steps and
saves them again. Loaded back, such an EMA is N steps behind its parameter, and resuming from it
would silently pull the weights back at the end of the task. So a state dict holds beside each
EMA (``ema_step``, plain Python numbers, which torch's loaders carry untouched) the step count of
its parameter's optimizer state at the save (LLaCAAdamW's own ``step``, the wrapped optimizer's
``step`` for LLaCA) and a probe of the EMA (a few of its elements, at fixed places).

A load finds an EMA stale when its step count moved on while the EMA did not: the count differs
from the saved one and the probe is the saved one. Both are needed. torch's state dicts hold the
optimizer's live tensors, not copies (and torch's loaders keep tensors that need no cast), so a
state dict kept in memory while training goes on has a step count *and* an EMA that moved on
together: its saved numbers are old, and the EMA is current. Where a foreign loader cast the EMA
to the parameter's dtype (torch's casts every floating tensor), the probes are compared at that
dtype. The stale EMA restarts from the current weights (as after ``end_task(keep_moments=True)``)
and a warning names the parameters. An optimizer without a step count (SGD) gives nothing to
compare: its EMAs load as saved.

Reading the numbers is a host read per device, at a save or a load, never at a step."""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from . import sharded

KEY = "ema_step"  # the state-dict entry beside each EMA: {"step": count, "probe": [values]}
PROBES = 16


def _probe(ema: Tensor) -> Tensor:
    flat = sharded.local(ema).detach().reshape(-1)
    if flat.numel() <= PROBES:
        return flat
    places = torch.linspace(0, flat.numel() - 1, PROBES, device=flat.device).long()
    return flat[places]


def readable(count: Any) -> bool:
    return count is not None and not (isinstance(count, Tensor) and count.is_meta)


def _numbers(values: list[Tensor | float | int]) -> list[Any]:
    """Tensors as Python numbers (a list for more than one element), one host read per device."""
    out: list[Any] = list(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, value in enumerate(values):
        if isinstance(value, Tensor):
            by_device.setdefault(value.device, []).append(i)
    for positions in by_device.values():
        flat = torch.cat([values[i].detach().reshape(-1).to(torch.float64) for i in positions]).tolist()
        start = 0
        for i in positions:
            n = values[i].numel()
            out[i] = flat[start] if values[i].dim() == 0 else flat[start:start + n]
            start += n
    return out


def mark(entries: list[tuple[dict[str, Any], Any]]) -> None:
    """Writes the mark beside the EMA of each ``(state-dict entry, step count)``."""
    entries = [(entry, count) for entry, count in entries if readable(count) and not entry["ema"].is_meta]
    numbers = _numbers([x for entry, count in entries for x in (count, _probe(entry["ema"]))])
    for i, (entry, _) in enumerate(entries):
        probe = numbers[2 * i + 1]
        entry[KEY] = {"step": numbers[2 * i], "probe": probe if isinstance(probe, list) else [probe]}


def find(loaded: list[tuple[Any, Any, Any, Tensor, torch.dtype | None]]) -> list[tuple[Any, str]]:
    """Of ``(key, mark, step count now, EMA now, dtype a foreign loader cast it to or None)``,
    those whose EMA is stale, with what to say of each."""
    loaded = [item for item in loaded if isinstance(item[1], dict) and readable(item[2])]
    numbers = _numbers([x for _, _, count, ema, _ in loaded for x in (count, _probe(ema))])
    stale = []
    for i, (key, saved, _, _, cast) in enumerate(loaded):
        count, probe = numbers[2 * i], numbers[2 * i + 1]
        probe = probe if isinstance(probe, list) else [probe]
        then = saved.get("probe")
        if cast is not None and then is not None:
            then = torch.tensor(then, dtype=torch.float64).to(cast).double().tolist()
            probe = torch.tensor(probe, dtype=torch.float64).to(cast).double().tolist()
        if count != saved.get("step") and probe == then:
            stale.append((key, f"EMA saved at step {saved.get('step')}, its state now at step {count}"))
    return stale


def warn(stale: list[str], owner: str) -> None:
    if stale:
        shown = "; ".join(stale[:3]) + (f"; and {len(stale) - 3} more" if len(stale) > 3 else "")
        warnings.warn(
            f"llaca_optim: the state dict ({owner}) holds EMAs that did not follow their "
            f"parameters' steps ({shown}): it passed through an optimizer that steps without "
            "keeping the EMA (torch.optim.AdamW, say). Those EMAs restart from the current "
            "weights at the next step, as after end_task(keep_moments=True); load a state dict "
            "that LLaCAAdamW or LLaCA saved at the same step to resume them",
            UserWarning, stacklevel=4)
