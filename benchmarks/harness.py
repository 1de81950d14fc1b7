"""Timing and memory measurement of contenders on one workload.

How time is taken:

* CPU: all contenders of a measurement are built on the same parameters and stepped in
  round-robin order, one step each per round, timed with ``time.perf_counter``. Interleaving puts
  every contender under the same machine conditions (frequency, other load, page cache), which on
  a shared 2-core machine matters more than anything else; ratios are taken between medians. The
  order is shuffled every round (a fixed seed): a step that follows one which swept the caches
  (the ``copy`` row, the published loop's temporaries) runs measurably slower, and a fixed order
  would charge that to whichever contender always came next.
* CUDA: contenders are measured one after the other (a ``full`` workload's states do not fit on
  the GPU together), each step between two CUDA events after a warm-up, and the GPU synchronised
  once per contender, not per step.

Every contender gets ``warmup`` untimed steps (the first LLaCA step only takes the EMA copy, and
the first call may build or load kernels), then up to ``steps`` timed ones, fewer when it has
used ``budget_s`` seconds (the published loop on 10,000 tensors takes seconds per step).

Memory: ``state_bytes`` is the optimizer state a contender keeps; ``step_alloc_bytes`` is what one
step allocates: on CUDA the rise of the peak allocated memory over the step, on the CPU the bytes
allocated by the ops of the step as torch.profiler records them (docs/spec.md section 5: "no per-step
allocation proportional to the model").
"""

from __future__ import annotations

import contextlib
import os
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch

from .contenders import Contender, Stepper


@dataclass
class Measurement:
    times_s: list[float]
    state_bytes: int
    step_alloc_bytes: int | None
    error: str | None = None  # why the contender could not be built or stepped (then no times)

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)

    def quantile_s(self, q: float) -> float:
        xs = sorted(self.times_s)
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _state_bytes(stepper: Stepper) -> int:
    return sum(t.numel() * t.element_size() for t in stepper.state_tensors())


@contextlib.contextmanager
def _native_stderr_silenced():
    """The profiler's native code writes to the process's stderr at each start and stop (kineto's
    "USDT ... profiler_start" lines, the CPU allocator's warning of blocks allocated before it
    started), which would flood the progress bar: file descriptor 2 goes to /dev/null meanwhile.
    Python's own errors still raise as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_step_alloc_bytes(stepper: Stepper) -> int | None:
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:  # pragma: no cover
        return None
    with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stepper.step()
    return int(sum(max(0, e.self_cpu_memory_usage) for e in prof.events()))


def _cuda_step_alloc_bytes(stepper: Stepper, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    stepper.step()
    torch.cuda.synchronize(device)
    return max(0, torch.cuda.max_memory_allocated(device) - before)


def _cheap_to_profile(contender: Contender, times_s: list[float]) -> bool:
    # The profiler's event parsing costs seconds for a step of thousands of small ops (the
    # reference and the published loop on many tensors); those rows go without the figure when
    # their steps are slow. A native backend's step is a few ops however long it takes, and its
    # figure is what docs/spec.md section 5's memory rule is read from: always measured (by time, a
    # loaded machine once dropped it).
    if contender.kind == "ours" and contender.backend != "reference":
        return True
    return statistics.median(times_s) < 0.05


def measure_cpu(contenders: list[Contender], params: list[torch.Tensor], warmup: int, steps: int,
                budget_s: float, on_progress=None, memory: bool = True) -> dict[str, Measurement]:
    # Interleaved contenders step the same parameters, so between two steps of a deferring
    # optimizer the others changed them: its in-place warning is right, and beside the point of
    # a timing (the values do not change the work).
    warnings.filterwarnings("ignore", message="llaca_optim: parameters were changed in place")
    errors: dict[str, str] = {}

    def guarded(name: str, action) -> None:  # one contender failing must not end the run
        try:
            action()
        except Exception as err:  # noqa: BLE001
            errors[name] = f"{type(err).__name__}: {err}"[:300]

    steppers: dict[str, Stepper] = {}
    for c in contenders:
        guarded(c.name, lambda c=c: steppers.__setitem__(c.name, c.build(params)))
    for _ in range(warmup):
        for name, s in steppers.items():
            if name not in errors:
                guarded(name, s.step)
    times: dict[str, list[float]] = {name: [] for name in steppers}
    spent: dict[str, float] = {name: 0.0 for name in steppers}
    order = random.Random(0)
    for _ in range(steps):
        active = [n for n in steppers
                  if n not in errors and (len(times[n]) < 3 or spent[n] < budget_s)]
        if not active:
            break
        order.shuffle(active)
        for name in active:
            start = time.perf_counter()
            guarded(name, steppers[name].step)
            elapsed = time.perf_counter() - start
            if name in errors:
                continue
            times[name].append(elapsed)
            spent[name] += elapsed
        if on_progress:
            on_progress()
    out = {name: Measurement([], 0, None, error=why) for name, why in errors.items()}
    by_name = {c.name: c for c in contenders}
    for name, s in steppers.items():
        if name not in errors:
            profiled = memory and _cheap_to_profile(by_name[name], times[name])
            out[name] = Measurement(times[name], _state_bytes(s),
                                    _cpu_step_alloc_bytes(s) if profiled else None)
    return out


def measure_cuda(contenders: list[Contender], params: list[torch.Tensor], warmup: int, steps: int,
                 budget_s: float, on_progress=None) -> dict[str, Measurement]:
    device = params[0].device
    out = {}
    for c in contenders:
        stepper = None
        try:
            stepper = c.build(params)
            for _ in range(warmup):
                stepper.step()
            torch.cuda.synchronize(device)
            events = []
            wall = time.perf_counter()
            for _ in range(steps):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                stepper.step()
                end.record()
                events.append((start, end))
                if len(events) >= 3 and time.perf_counter() - wall > budget_s:
                    break
            torch.cuda.synchronize(device)
            times = [s.elapsed_time(e) / 1e3 for s, e in events]
            out[c.name] = Measurement(times, _state_bytes(stepper),
                                      _cuda_step_alloc_bytes(stepper, device))
        except Exception as err:  # noqa: BLE001 - one contender failing must not end the run
            # (a first run on a new GPU, or a capture that fails): its row says why instead.
            out[c.name] = Measurement([], 0, None, error=f"{type(err).__name__}: {err}"[:300])
        del stepper
        torch.cuda.empty_cache()
        if on_progress:
            on_progress()
    return out


def measure(contenders: list[Contender], params: list[torch.Tensor], warmup: int = 3,
            steps: int = 30, budget_s: float = 5.0, on_progress=None, memory: bool = True
            ) -> dict[str, Measurement]:
    """``memory=False`` skips the per-step allocation count on the CPU: the profiler that takes it
    needs seconds to parse a step of thousands of per-tensor ops (the sweeps do without it)."""
    if params[0].device.type == "cuda":
        return measure_cuda(contenders, params, warmup, steps, budget_s, on_progress)
    return measure_cpu(contenders, params, warmup, steps, budget_s, on_progress, memory)
