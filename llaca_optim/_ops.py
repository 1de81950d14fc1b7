"""The ``torch.library`` ops of llaca_optim: schemas, fake implementations, and nothing else.

The schemas are declared here, in Python, so that they exist whether or not the native extension
was built; each native backend registers its kernel for its dispatch key under these names
(``TORCH_LIBRARY_IMPL(llaca_optim, CPU, m)`` in csrc/cpu/, CUDA in csrc/cuda/), and PyTorch's
dispatcher routes a call by the tensors' device. Mutated arguments carry ``(x!)`` annotations so
that torch.compile and functionalization know what the ops write.

The ops take per-tensor lists grouped by the caller into one (device, dtype) bucket:

* ``adamw_llaca_``: the fused step; AdamW on ``params``/moments/``state_steps`` and, when ``llaca``
  is true, the LLaCA update on ``emas``/``prev_grads`` with one alpha and one fallback flag per
  tensor written into ``alphas``/``fell_back`` (one-element tensors, so reading them needs no
  host synchronisation). With ``llaca`` false the four LLaCA lists may be empty.
* ``llaca_update_``: the LLaCA update alone, after any other optimizer's step.
* ``llaca_flush_``: applies the blends that a deferring ``adamw_llaca_`` left pending.

``ema_pending`` holds one bool per tensor, or is empty. Empty: the step blends every EMA itself
(every backend). Given (the CUDA and CPU kernels, NOTE [CUDA deferred blend] in
csrc/cuda/layout.h and NOTE [CPU deferred blend]; the Triton backend does the same outside these
ops):
a set flag on entry means the tensor's EMA still lacks the blend of its last step, whose alpha is
in ``alphas``; the step applies it first, and may leave its own blend pending, setting the flag.
Before anything reads such an EMA, ``llaca_flush_`` applies the pending blends and clears the
flags. The kernels read and write the flags on the device: no host synchronisation, and a CUDA
graph replay sees a flush made between replays.

A negative value in ``alphas[i]`` on entry marks a tensor whose EMA and previous gradient are not
yet set (its first LLaCA step): the kernels then fill them from the stepped parameter and the
gradient. Keeping that mark on the device, rather than as a host-side flag, means a step skipped
for an AMP overflow leaves it in place without any host synchronisation. With
``found_inf`` non-zero nothing is changed (AMP overflow); ``grad_scale`` divides the gradients.

``shard_sums`` (float64, one row ``(a, b, c)`` per tensor) is the sharded-training mode (NOTE
[sharded parameters] in llaca_optim/_sharded.py): the tensors are local shards of larger ones, so
their sums are not the whole tensor's. Given it, a kernel writes each tensor's local sums
``a = sum|p - ema|, b = sum|g|, c = sum|g - g_prev|`` into its row and stops there: it writes no
alpha, fallback flag or pending flag and does not blend this step's EMA (a blend pending on entry
is still applied first). The caller all-reduces the rows across the shards, turns them into
alphas and pending flags (``ShardReduce.finish_alphas`` in _sharded.py) and blends through
``llaca_flush_`` or the next step.
"""

from __future__ import annotations

import torch

NAMESPACE = "llaca_optim"

ADAMW_LLACA_SCHEMA = (
    "adamw_llaca_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, "
    "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps, "
    "Tensor(f!)[] emas, Tensor(g!)[] prev_grads, Tensor(h!)[] alphas, Tensor(i!)[] fell_back, "
    "Tensor(j!)[] ema_pending, *, float lr, float beta1, float beta2, float weight_decay, float eps, "
    "bool amsgrad, bool maximize, bool llaca, float scale, float base_weight, "
    "Tensor? lr_tensor=None, Tensor? grad_scale=None, Tensor? found_inf=None, "
    "Tensor(k!)? shard_sums=None) -> ()"
)

LLACA_UPDATE_SCHEMA = (
    "llaca_update_(Tensor[] params, Tensor[] grads, Tensor(a!)[] emas, Tensor(b!)[] prev_grads, "
    "Tensor(c!)[] alphas, Tensor(d!)[] fell_back, *, float scale, "
    "float base_weight, Tensor? grad_scale=None, Tensor? found_inf=None, "
    "Tensor(e!)? shard_sums=None) -> ()"
)

LLACA_FLUSH_SCHEMA = (
    "llaca_flush_(Tensor[] params, Tensor(a!)[] emas, Tensor[] alphas, "
    "Tensor(b!)[] ema_pending) -> ()"
)

SCHEMAS = (ADAMW_LLACA_SCHEMA, LLACA_UPDATE_SCHEMA, LLACA_FLUSH_SCHEMA)

# Keeping the Library object alive keeps the definitions registered.
_library = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS:
    _library.define(_schema)


@torch.library.register_fake(f"{NAMESPACE}::adamw_llaca_")
def _adamw_llaca_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, emas,
                      prev_grads, alphas, fell_back, ema_pending, *, lr, beta1, beta2, weight_decay, eps,
                      amsgrad, maximize, llaca, scale, base_weight, lr_tensor=None,
                      grad_scale=None, found_inf=None, shard_sums=None) -> None:
    # In-place on its arguments, no outputs: shapes and dtypes never change.
    return None


@torch.library.register_fake(f"{NAMESPACE}::llaca_update_")
def _llaca_update_fake(params, grads, emas, prev_grads, alphas, fell_back, *, scale,
                       base_weight, grad_scale=None, found_inf=None, shard_sums=None) -> None:
    return None


@torch.library.register_fake(f"{NAMESPACE}::llaca_flush_")
def _llaca_flush_fake(params, emas, alphas, ema_pending) -> None:
    return None


adamw_llaca_ = torch.ops.llaca_optim.adamw_llaca_
llaca_update_ = torch.ops.llaca_optim.llaca_update_
