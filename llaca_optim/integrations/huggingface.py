"""LLaCA in the Hugging Face ``Trainer``: task boundaries and alpha logging as a callback.

``LLaCAAdamW`` already works in the Trainer as it is (``optimizers=(LLaCAAdamW(...), None)`` or
``optimizer_cls_and_kwargs=(LLaCAAdamW, {...})``): its state dict carries the EMA, so a
checkpoint resumes bit for bit, and GradScaler (``fp16=True``) hands it the scale and overflow
flag as it does torch's fused AdamW. What the Trainer has no place for is the end of a task.
:class:`LLaCACallback` supplies it::

    from llaca_optim.integrations.huggingface import LLaCACallback

    for task in tasks:                               # one dataset after another
        trainer = Trainer(model=model, args=args, train_dataset=task,
                          optimizer_cls_and_kwargs=(LLaCAAdamW, {"preset": "coin"}),
                          callbacks=[LLaCACallback()])
        trainer.train()                              # ends with weights <- EMA
        trainer.save_model()                         # saves the EMA weights

A Trainer per task builds a fresh optimizer, and ``end_task`` leaves the optimizer exactly as a
fresh one, so this is the published recipe (a new run per task) with the EMA put into the
weights where it ends. Passing one optimizer to every Trainer (``optimizers=(opt, None)``) does
the same. This module imports ``transformers``; ``import llaca_optim`` does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

# The Trainer's optimizer_cls_and_kwargs (the recipe in the README and docs/integrations.md)
# came with transformers 4.47; pyproject.toml's extras ask for the same floor (a test holds the
# two together).
MIN_TRANSFORMERS = "4.47"

try:
    import transformers
    from packaging.version import Version  # a dependency of transformers
    from transformers import TrainerCallback
except ImportError as err:  # say what is missing, not only that an import failed
    raise ImportError("llaca_optim.integrations.huggingface needs transformers>="
                      f"{MIN_TRANSFORMERS} (and accelerate, which its Trainer uses): pip install "
                      f"'transformers>={MIN_TRANSFORMERS}' accelerate") from err


if Version(transformers.__version__).release < Version(MIN_TRANSFORMERS).release:
    raise ImportError(
        f"llaca_optim.integrations.huggingface needs transformers>={MIN_TRANSFORMERS} (the "
        f"Trainer's optimizer_cls_and_kwargs), found {transformers.__version__}: pip install "
        f"'transformers>={MIN_TRANSFORMERS}'")

from ..optim import telemetry
from ..optim.base import LLaCAOptimizerBase

logger = logging.getLogger(__name__)

__all__ = ["LLaCACallback", "alpha_summary", "llaca_optimizer"]


def llaca_optimizer(optimizer: Any) -> LLaCAOptimizerBase:
    """The ``LLaCAAdamW`` or ``LLaCA`` inside ``optimizer``, which may be wrapped (accelerate's
    ``AcceleratedOptimizer``, which the Trainer hands out as ``trainer.optimizer``, keeps it
    as ``.optimizer``). Use it to reach the task API from a Trainer::

        with llaca_optimizer(trainer.optimizer).ema_weights():
            trainer.evaluate()                       # evaluate the EMA, live weights restored
    """
    seen, chain = optimizer, []
    for _ in range(8):  # a wrapper of a wrapper at most, in practice; never loops forever
        if isinstance(seen, LLaCAOptimizerBase):
            return seen
        chain.append(type(seen).__name__)
        seen = getattr(seen, "optimizer", None)
        if seen is None:
            break
    what = " wrapping ".join(chain)
    raise TypeError(
        f"llaca_optim: the optimizer is {what}, which is not (and does not "
        "wrap) LLaCAAdamW or LLaCA; give the Trainer one: Trainer(..., optimizers="
        "(LLaCAAdamW(model.parameters(), ...), None)) or Trainer(..., optimizer_cls_and_kwargs="
        "(LLaCAAdamW, {...}))")


class LLaCACallback(TrainerCallback):
    """Ends the LLaCA task when ``trainer.train()`` ends and logs the balance weights.

    Args:
        end_task: at the end of training, copy every EMA into its parameter and reset the
            optimizer (:meth:`LLaCAAdamW.end_task`). ``False`` leaves that to you.
        keep_moments: passed to ``end_task``: keep AdamW's moments and step counts.
        on_task_end: called as ``on_task_end(model, optimizer)`` when training ends, before
            ``end_task``, on every rank: the moment the EMA and the live weights are both still
            there, inside ``train()``. For example, to keep the whole EMA weights under
            DeepSpeed ZeRO (a collective: every rank calls it)::

                from llaca_optim.integrations.deepspeed import ema_state_dict
                kept = {}
                LLaCACallback(on_task_end=lambda model, opt: kept.update(ema_state_dict(model, opt)))
        log_alphas: at each logging step add ``llaca/alpha_median`` (over the tensors that have
            had a LLaCA step) and ``llaca/alpha_fallback_fraction`` (the share of tensors whose
            alpha fell back to ``base_weight``) to the log entry in ``trainer.state.log_history``
            and to the ``logs`` that callbacks after this one receive. Reading them
            synchronises with the device, once per logging step, as the Trainer's own loss
            logging does.

    The optimizer is checked when training begins, so a Trainer given another optimizer fails
    before its first step. With ``load_best_model_at_end=True`` the Trainer loads the best
    checkpoint's weights before this callback runs, and ``end_task`` then replaces them with
    the EMA of the last step (LLaCA's answer for the task); pass ``end_task=False`` to keep them.
    """

    def __init__(self, end_task: bool = True, keep_moments: bool = False,
                 log_alphas: bool = True,
                 on_task_end: Callable[[Any, LLaCAOptimizerBase], None] | None = None) -> None:
        for name, value in (("end_task", end_task), ("keep_moments", keep_moments),
                            ("log_alphas", log_alphas)):
            if not isinstance(value, bool):
                raise TypeError(f"LLaCACallback: {name} must be True or False, got {value!r}")
        if on_task_end is not None and not callable(on_task_end):
            raise TypeError("LLaCACallback: on_task_end must be a function of (model, optimizer), "
                            f"got {on_task_end!r}")
        self.end_task = end_task
        self.keep_moments = keep_moments
        self.log_alphas = log_alphas
        self.on_task_end = on_task_end
        self._logged_step: int | None = None
        self._task_start = 0
        self._fallback_streak = 0
        self._last: dict[str, float] = {}
        self._said: set[str] = set()
        self._horizon = False  # whether a group sets its level with horizon (the knob to name)

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        if not self.log_alphas or logs is None or optimizer is None:
            return
        # Once per step: the Trainer's end-of-training entry (train_runtime...) comes at the step
        # of the last loss entry, whose alphas are already logged.
        if "train_runtime" in logs or state.global_step == self._logged_step:
            return
        self._logged_step = state.global_step
        summary = alpha_summary(llaca_optimizer(optimizer))
        if summary:
            logs.update(summary)
            if state.log_history:  # the Trainer appended this entry just before on_log
                state.log_history[-1].update(summary)
            self._last = summary
            fixed = summary["llaca/alpha_fallback_fraction"] >= telemetry.FALLBACK_SHARE
            self._fallback_streak = self._fallback_streak + 1 if fixed else 0
            if self._fallback_streak >= 3:  # three logging steps in a row: not a passing phase
                self._say(summary, state.global_step - self._task_start, only=telemetry.FIXED_EMA)

    def _say(self, summary: dict[str, float], steps: int, only: str | None = None) -> None:
        """Logs, once per callback and kind, what the balance weights say about the settings
        (llaca_optim/optim/telemetry.py): the same words as the optimizer's warning."""
        for code, message in telemetry.diagnose(summary["llaca/alpha_median"],
                                                summary["llaca/alpha_fallback_fraction"], steps,
                                                self._horizon):
            if code not in self._said and (only is None or code == only):
                self._said.add(code)
                logger.warning(message)

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._horizon = telemetry.uses_horizon(llaca_optimizer(optimizer))
        self._logged_step = None
        self._task_start = state.global_step
        self._fallback_streak = 0
        self._last = {}

    def on_train_end(self, args, state, control, optimizer=None, model=None, **kwargs):
        ours = llaca_optimizer(optimizer)
        if self.log_alphas:
            summary = alpha_summary(ours) or self._last
            if summary:
                self._say(summary, state.global_step - self._task_start)
        if self.on_task_end is not None:
            self.on_task_end(model, ours)
        if self.end_task:
            ours.end_task(keep_moments=self.keep_moments)


def alpha_summary(optimizer: LLaCAOptimizerBase) -> dict[str, float]:
    """The median alpha and the fallback fraction over the tensors that have had a LLaCA step
    (an alpha slot below 0 marks a tensor that has not); empty before the first one."""
    found = optimizer.alphas()
    summary = telemetry.summarize(found.alphas, found.fell_back)
    if summary is None:
        return {}
    return {"llaca/alpha_median": summary[0], "llaca/alpha_fallback_fraction": summary[1]}
