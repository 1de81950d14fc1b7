"""The ``torch.library`` ops of llaca_optim: their schemas, built from the role table, and the
namespaces that carry them.

``llaca_optim::adamw_llaca_`` and its two siblings are the one way a step reaches a kernel. The
schemas are declared here, in Python, so that they exist whether or not the native extension was
built; the reference implementation (``ops/reference_kernels.py``) is registered as their default kernel
(``CompositeExplicitAutograd``: any device without a kernel of its own), and the extension
registers its C++ kernels for the CPU and CUDA dispatch keys under the same names, which take
precedence there. Mutated arguments carry ``(x!)`` annotations so that torch.compile and
functionalization know what the ops write.

The same schemas also define sibling namespaces, one per implementation that must be reachable
whatever the dispatcher would pick for the tensors' device: ``llaca_optim_reference`` (the
reference on every device, also where the extension has a CPU kernel), ``llaca_optim_triton``
(the Triton kernels, on CUDA tensors or under Triton's CPU interpreter), and the test suite's
emulated CUDA build. A backend (``ops/registry.py``) is one such namespace plus what it accepts.

The ops take per-tensor lists (the roles of ``roles.py``) of one (device, dtype) bucket:

* ``adamw_llaca_``: the fused step; AdamW on ``params``/moments/``state_steps`` and, when ``llaca``
  is true, the LLaCA update on ``emas``/``prev_grads`` with one alpha and one fallback flag per
  tensor written into ``alphas``/``alpha_fell_backs`` (one-element tensors, so reading them needs no
  host synchronisation). With ``llaca`` false the LLaCA lists may be empty.
* ``llaca_update_``: the LLaCA update alone, after any other optimizer's step.
* ``llaca_flush_``: applies the blends that a deferring ``adamw_llaca_`` left pending.

``ema_pending`` holds one bool per tensor, or is empty. Empty: the step blends every EMA itself
(every backend). Given (backends that defer, NOTE [deferred blend] in optim/deferred.py): a set
flag on entry means the tensor's EMA still lacks the blend of its last step, whose alpha is in
``alphas``; the step applies it first, and may leave its own blend pending, setting the flag.
Before anything reads such an EMA, ``llaca_flush_`` applies the pending blends and clears the
flags. The kernels read and write the flags on the device: no host synchronisation, and a CUDA
graph replay sees a flush made between replays.

A negative value in ``alphas[i]`` on entry marks a tensor whose EMA and previous gradient are not
yet set (its first LLaCA step): the kernels then fill them from the stepped parameter and the
gradient. Keeping that mark on the device, rather than as a host-side flag, means a step skipped
for an AMP overflow leaves it in place without any host synchronisation. With ``found_inf``
non-zero nothing is changed (AMP overflow); ``grad_scale`` divides the gradients.

``mean_norms`` picks the balance weight's norms (the ``norms`` knob, docs/spec.md section 2): false
for the published L1 sums, true for the size-invariant L1 means, each sum divided by its tensor's
element count before alpha is formed.

``shard_sums`` (float64, one row ``(a, b, c)`` per tensor) is the sharded-training mode (NOTE
[sharded parameters] in optim/sharded.py): the tensors are local shards of larger ones, so their
sums are not the whole tensor's. Given it, a kernel writes each tensor's local sums
``a = sum|p - ema|, b = sum|g|, c = sum|g - g_prev|`` into its row and stops there: it writes no
alpha, fallback flag or pending flag and does not blend this step's EMA (a blend pending on entry
is still applied first). The caller all-reduces the rows across the shards, turns them into
alphas and pending flags and blends through ``llaca_flush_`` or the next step.
"""

from __future__ import annotations

from collections.abc import Callable
from string import ascii_lowercase
from typing import Any

import torch

from .. import reference
from .roles import ADAMW_LLACA, LLACA_FLUSH, LLACA_UPDATE, OP_NAMES, roles_of

NAMESPACE = "llaca_optim"

# Each op's scalar arguments, after its lists (keyword-only). A trailing "!" marks a written one.
_SCALARS = {
    ADAMW_LLACA: ("float lr", "float beta1", "float beta2", "float weight_decay", "float eps",
                  "bool amsgrad", "bool maximize", "bool llaca", "float scale",
                  "float base_weight", "bool mean_norms=False", "Tensor? lr_tensor=None", "Tensor? grad_scale=None",
                  "Tensor? found_inf=None", "Tensor!? shard_sums=None"),
    LLACA_UPDATE: ("float scale", "float base_weight", "bool mean_norms=False", "Tensor? grad_scale=None",
                   "Tensor? found_inf=None", "Tensor!? shard_sums=None"),
    LLACA_FLUSH: (),
}


def schema(op: str) -> str:
    """``op``'s schema: its role lists in table order, written ones annotated, then its scalars."""
    aliases = iter(ascii_lowercase)
    args = [f"Tensor({next(aliases)}!)[] {role.arg}" if role.ops[op] == "w" else f"Tensor[] {role.arg}"
            for role in roles_of(op)]
    for scalar in _SCALARS[op]:
        args.append(scalar.replace("Tensor!", f"Tensor({next(aliases)}!)") if "!" in scalar else scalar)
    lists, scalars = args[: len(roles_of(op))], args[len(roles_of(op)):]
    return f"{op}({', '.join(lists)}{', *, ' + ', '.join(scalars) if scalars else ''}) -> ()"


SCHEMAS = tuple(schema(op) for op in OP_NAMES)

# The finish of a sharded step: every tensor's alpha, fallback flag and pending blend from its
# whole-tensor sums (NOTE [sharded parameters] in optim/sharded.py). Not a role op: it takes the
# bucket's reduced sums and its slot vectors. Its default kernel, on every namespace and device,
# is the math layer's (llaca_optim/reference.py, beside the per-tensor rule it vectorizes), so
# the alpha rule is written once per language: there, csrc/include/llaca/math.h, and the Triton
# kernels.
ALPHAS = "llaca_alphas_"
# With horizon > 0 the rule is the horizon's (NOTE [horizon] in optim/sharded.py), which reads
# and updates each tensor's signal statistic (empty tensors otherwise).
ALPHAS_SCHEMA = ("llaca_alphas_(Tensor sums, Tensor elements, Tensor(a!) alpha, "
                 "Tensor(b!) alpha_fell_back, Tensor(c!) signal_log_mean, Tensor(d!) signal_count, "
                 "Tensor(e!) pending, *, float scale, float base_weight, bool mean_norms, "
                 "float horizon=0., Tensor? found_inf=None) -> ()")

_libraries: dict[str, torch.library.Library] = {}  # keeping them alive keeps the ops defined
_implemented: set[tuple[str, str]] = set()


def _fake(*args: Any, **kwargs: Any) -> None:
    # In place on their arguments, no outputs: shapes and dtypes never change.
    return None


def define(namespace: str) -> Any:
    """Defines the ops under ``namespace`` (once) and returns ``torch.ops.<namespace>``."""
    if namespace not in _libraries:
        library = torch.library.Library(namespace, "DEF")
        for text in SCHEMAS:
            library.define(text)
        _libraries[namespace] = library
        for op in OP_NAMES:
            torch.library.register_fake(f"{namespace}::{op}", _fake, lib=library)
        library.define(ALPHAS_SCHEMA)
        torch.library.register_fake(f"{namespace}::{ALPHAS}", _fake, lib=library)
        library.impl(ALPHAS, reference.alphas_from_sums_, "CompositeExplicitAutograd")
    return getattr(torch.ops, namespace)


def implement(namespace: str, kernels: dict[str, Callable[..., None]],
              dispatch_key: str = "CompositeExplicitAutograd") -> Any:
    """Registers Python ``kernels`` (op name -> function with the op's signature) for
    ``namespace``'s ops under ``dispatch_key`` (once per namespace and key); returns the ops."""
    ops = define(namespace)
    if (namespace, dispatch_key) not in _implemented:
        for op, kernel in kernels.items():
            _libraries[namespace].impl(op, kernel, dispatch_key)
        _implemented.add((namespace, dispatch_key))
    return ops


define(NAMESPACE)
