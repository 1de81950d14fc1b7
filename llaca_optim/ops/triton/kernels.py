"""Triton kernels of the fused AdamW + LLaCA step and of the standalone LLaCA update.

Three launches per call, whatever the number of tensors (docs/spec.md section 4):

1. ``_step_blocks``, one program per block of BLOCK elements of any tensor: the AdamW step
   (when ADAMW), the LLaCA sums a = sum|p - ema|, b = sum|g|, c = sum|g - g_prev| of the block
   into its own slot of ``partials``, g_prev <- g, and ema <- p on a tensor's first LLaCA step.
2. ``_finish_tensors``, one program per tensor: the step counter, then the tensor's block sums
   added in a fixed order (fp64), alpha, the fallback flag and the "fresh" mark for pass 3.
3. ``_blend_blocks``, one program per block again: ema <- ema + alpha (p - ema).

With DEFER (the bucket has ``ema_pending`` flags: the deferred blend of NOTE [CUDA deferred blend]
in csrc/cuda/kernel_args.h, the same design) pass 3 is not launched: pass 1 first applies the blend the
last step left pending (its alpha is still in the slot, since pass 2 of this step runs after),
from p before its AdamW update, stores the EMA and sums against it; pass 2 marks the new blend
pending. The step is then one pass over memory. ``_flush_blocks`` and ``_clear_pending`` apply
and clear pending blends.

With SHARDED (sharded parameters, NOTE [sharded parameters] in llaca_optim/optim/sharded.py) pass 2
writes each tensor's sums to its row of ``shard_sums`` instead of alpha, and pass 3 is not
launched: alpha and the blend come after the sums of all shards are added.

Tensors are reached through a table of raw addresses in device memory (one row per role, one
column per tensor), cast to typed pointers in the kernel; which tensor and offset a block covers
comes from two more tables. Block offsets are int64 (tensors over 2^31 elements). Every
hyperparameter is a runtime argument, so a new learning rate never recompiles; the dtypes, the
block size and which optional tensors exist (lr, grad scale, found-inf) are compile-time.
Sums are per-block ``tl.sum`` (a fixed tree) and a fixed-order pass over the blocks, so the result
is the same bits run after run. The bias corrections are formed in fp64 from the device step
counter, like the CPU kernel does on the host.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..roles import TABLE_ROW

# Rows of the address table, from the role table (constexpr: kernels may only read globals of
# that kind).
P, G, M, V, VMAX, EMA, GPREV, STEP, ALPHA, FELL_BACK, PENDING = (tl.constexpr(TABLE_ROW[arg]) for arg in (
    "params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "emas", "prev_grads",
    "state_steps", "alphas", "alpha_fell_backs", "ema_pending"))


@triton.jit
def _narrow(x, DT: tl.constexpr):
    """fp32 -> storage dtype with round-to-nearest-even. For bfloat16 the rounding is done on the
    bits first, so the final cast only drops zeros: GPUs round to nearest even anyway, but
    Triton's CPU interpreter truncates, and the tests run there."""
    if DT == tl.bfloat16:
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        rounded = tl.where(x != x, 0x7FC00000, rounded)
        return rounded.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DT)


@triton.jit
def _addr(table, role, t, n_tensors):
    return tl.load(table + role * n_tensors + t)


@triton.jit
def _array(table, role, t, n_tensors, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """Tensor ``t``'s array of ``role`` as a typed pointer. ALIGNED (every address of the call
    is a multiple of 16 bytes, checked on the host) lets the compiler use 16-byte vector loads."""
    ptr = _addr(table, role, t, n_tensors).to(tl.pointer_type(DT))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _ld(ptr, mask, MASKED: tl.constexpr):
    """A block's load; only the last block of a tensor is masked, because a bounds mask of
    unknown alignment keeps Triton from using vector loads (checked in the PTX)."""
    if MASKED:
        return tl.load(ptr, mask=mask, other=0.0)
    else:
        return tl.load(ptr)


@triton.jit
def _st(ptr, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr, value, mask=mask)
    else:
        tl.store(ptr, value)


@triton.jit
def _block(numels, block_tensor, block_start, BLOCK: tl.constexpr):
    """This program's block, tensor, element offsets (int64), bounds mask, and whether the block
    is full (needs no mask). Blocks start at multiples of BLOCK, which the hint passes on."""
    b = tl.program_id(0).to(tl.int64)
    t = tl.load(block_tensor + b).to(tl.int64)
    start = tl.multiple_of(tl.load(block_start + b), BLOCK)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    n = tl.load(numels + t)
    return b, t, offs, offs < n, start + BLOCK <= n


@triton.jit
def _step_blocks(
    table, numels, block_tensor, block_start, partials, n_tensors,
    lr_hi, lr_lo, beta1, beta2, one_minus_beta1, one_minus_beta2, log_beta1, log_beta2,
    wd_hi, wd_lo, eps,
    lr_ptr, grad_scale_ptr, found_inf_ptr,
    PDT: tl.constexpr, EDT: tl.constexpr, ADAMW: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, LLACA: tl.constexpr, HAS_LR_PTR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    DEFER: tl.constexpr, BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    b, t, offs, mask, full = _block(numels, block_tensor, block_start, BLOCK)
    if full:
        _step_block(table, partials, n_tensors, b, t, offs, mask, lr_hi, lr_lo, beta1, beta2,
                    one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, wd_hi, wd_lo, eps,
                    lr_ptr, grad_scale_ptr, PDT, EDT, ADAMW, AMSGRAD, MAXIMIZE, LLACA, HAS_LR_PTR,
                    HAS_GRAD_SCALE, ALIGNED, DEFER, False)
    else:
        _step_block(table, partials, n_tensors, b, t, offs, mask, lr_hi, lr_lo, beta1, beta2,
                    one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, wd_hi, wd_lo, eps,
                    lr_ptr, grad_scale_ptr, PDT, EDT, ADAMW, AMSGRAD, MAXIMIZE, LLACA, HAS_LR_PTR,
                    HAS_GRAD_SCALE, ALIGNED, DEFER, True)


@triton.jit
def _step_block(
    table, partials, n_tensors, b, t, offs, mask, lr_hi, lr_lo, beta1, beta2,
    one_minus_beta1, one_minus_beta2, log_beta1, log_beta2, wd_hi, wd_lo, eps,
    lr_ptr, grad_scale_ptr,
    PDT: tl.constexpr, EDT: tl.constexpr, ADAMW: tl.constexpr, AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr, LLACA: tl.constexpr, HAS_LR_PTR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, ALIGNED: tl.constexpr, DEFER: tl.constexpr,
    MASKED: tl.constexpr,
):
    """Pass 1 on one block (see the module docstring); MASKED only for a tensor's last block.

    Every address and every load comes before the first store: the arrays are reached through
    the address table, so the compiler must assume that a store may alias any later load (the
    table included) and would wait for the stores before issuing it, one memory round trip more
    per group of loads (NOTE [CUDA loads before stores] in csrc/cuda/kernel_args.h). On a tensor's
    first LLaCA step the EMA and previous gradient are read too (they exist from the state's
    creation: a copy of p and zeros) and go unused."""
    p_ptr = _array(table, P, t, n_tensors, PDT, ALIGNED)
    g_ptr = _array(table, G, t, n_tensors, PDT, ALIGNED)
    if ADAMW:
        m_ptr = _array(table, M, t, n_tensors, PDT, ALIGNED)
        v_ptr = _array(table, V, t, n_tensors, PDT, ALIGNED)
        step_ptr = _addr(table, STEP, t, n_tensors).to(tl.pointer_type(tl.float32))
        if AMSGRAD:
            vmax_ptr = _array(table, VMAX, t, n_tensors, PDT, ALIGNED)
    if LLACA:
        ema_ptr = _array(table, EMA, t, n_tensors, EDT, ALIGNED)
        gprev_ptr = _array(table, GPREV, t, n_tensors, PDT, ALIGNED)
        alpha_ptr = _addr(table, ALPHA, t, n_tensors).to(tl.pointer_type(tl.float32))
        if DEFER:
            pending_ptr = _addr(table, PENDING, t, n_tensors).to(tl.pointer_type(tl.int8))

    g = _ld(g_ptr + offs, mask, MASKED).to(tl.float32)
    p = _ld(p_ptr + offs, mask, MASKED).to(tl.float32)
    if ADAMW:
        step = tl.load(step_ptr).to(tl.float64) + 1.0
        if HAS_LR_PTR:
            lr_now = tl.load(lr_ptr).to(tl.float64)
        m = _ld(m_ptr + offs, mask, MASKED).to(tl.float32)
        v = _ld(v_ptr + offs, mask, MASKED).to(tl.float32)
        if AMSGRAD:
            vmax = _ld(vmax_ptr + offs, mask, MASKED).to(tl.float32)
    if LLACA:
        alpha_in = tl.load(alpha_ptr)
        fresh = alpha_in < 0.0
        e = _ld(ema_ptr + offs, mask, MASKED).to(tl.float32)
        gp = _ld(gprev_ptr + offs, mask, MASKED).to(tl.float32)
        if DEFER:
            pending = tl.load(pending_ptr) != 0
    if HAS_GRAD_SCALE:
        g = g / tl.load(grad_scale_ptr).to(tl.float32)
    p_before = p  # p_t, which a pending blend of the last step needs

    if ADAMW:
        if not HAS_LR_PTR:
            # Float scalars arrive as fp32: a float lr comes as two of them (hi + lo) and is put
            # back together in fp64, so it equals the same lr given as a float64 tensor.
            lr_now = tl.cast(lr_hi, tl.float64) + tl.cast(lr_lo, tl.float64)
        # Scalar arguments arrive as fp32: the (1 - beta) terms and log(beta) are formed in
        # double on the host, so no 1 - 0.999f cancellation happens here.
        bias_correction1 = 1.0 - tl.exp(step * tl.cast(log_beta1, tl.float64))
        bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.cast(log_beta2, tl.float64)))
        step_size = (lr_now / bias_correction1).to(tl.float32)
        weight_decay = tl.cast(wd_hi, tl.float64) + tl.cast(wd_lo, tl.float64)
        decay = (1.0 - lr_now * weight_decay).to(tl.float32)
        b1f = beta1
        b2f = beta2
        bc2 = bias_correction2_sqrt.to(tl.float32)

        gd = -g if MAXIMIZE else g
        p = p * decay
        m = b1f * m + one_minus_beta1 * gd
        v = b2f * v + one_minus_beta2 * gd * gd
        second = v
        if AMSGRAD:
            vmax = tl.maximum(vmax, v)
            _st(vmax_ptr + offs, _narrow(vmax, PDT), mask, MASKED)
            second = vmax
        denom = tl.sqrt(second) / bc2 + eps
        p = p - step_size * m / denom
        p_stored = _narrow(p, PDT)
        _st(p_ptr + offs, p_stored, mask, MASKED)
        _st(m_ptr + offs, _narrow(m, PDT), mask, MASKED)
        _st(v_ptr + offs, _narrow(v, PDT), mask, MASKED)
        p = p_stored.to(tl.float32)  # LLaCA sees the parameter as stored, rounding included

    if LLACA:
        if fresh:
            _st(ema_ptr + offs, _narrow(p, EDT), mask, MASKED)
            sum_a = 0.0
            sum_b = 0.0
            sum_c = 0.0
        else:
            if DEFER:
                blended = _narrow(e + alpha_in * (p_before - e), EDT)
                e = tl.where(pending, blended.to(tl.float32), e)
                if pending:
                    _st(ema_ptr + offs, blended, mask, MASKED)
            sum_a = tl.sum(tl.where(mask, tl.abs(p - e), 0.0), axis=0)
            sum_b = tl.sum(tl.where(mask, tl.abs(g), 0.0), axis=0)
            sum_c = tl.sum(tl.where(mask, tl.abs(g - gp), 0.0), axis=0)
        _st(gprev_ptr + offs, _narrow(g, PDT), mask, MASKED)
        tl.store(partials + 3 * b + 0, sum_a)
        tl.store(partials + 3 * b + 1, sum_b)
        tl.store(partials + 3 * b + 2, sum_c)


@triton.jit
def _finish_tensors(
    table, tensor_first_block, tensor_blocks, partials, fresh_marks, n_tensors, numels,
    scale_hi, scale_lo, base_weight, found_inf_ptr, shard_sums,
    ADAMW: tl.constexpr, LLACA: tl.constexpr, HAS_FOUND_INF: tl.constexpr, DEFER: tl.constexpr,
    SHARDED: tl.constexpr, MEAN_NORMS: tl.constexpr, RBLOCK: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    if ADAMW:
        step_ptr = _addr(table, STEP, t, n_tensors).to(tl.pointer_type(tl.float32))
        tl.store(step_ptr, tl.load(step_ptr) + 1.0)
    if LLACA:
        alpha_ptr = _addr(table, ALPHA, t, n_tensors).to(tl.pointer_type(tl.float32))
        flag_ptr = _addr(table, FELL_BACK, t, n_tensors).to(tl.pointer_type(tl.int8))
        fresh = tl.load(alpha_ptr) < 0.0
        tl.store(fresh_marks + t, fresh.to(tl.int8))
        first = tl.load(tensor_first_block + t)
        count = tl.load(tensor_blocks + t)
        # Fixed-order sum of the block partials: lane k of the accumulators takes blocks
        # k, k + RBLOCK, ... in turn, then one tl.sum; the same bits on every run.
        acc_a = tl.zeros([RBLOCK], dtype=tl.float64)
        acc_b = tl.zeros([RBLOCK], dtype=tl.float64)
        acc_c = tl.zeros([RBLOCK], dtype=tl.float64)
        # A while loop, not `for k0 in range(0, count, RBLOCK)`: Triton 3.6's interpreter holds
        # a loaded scalar as a one-element array, which range() cannot take; compiled, the two
        # are the same loop.
        k0 = tl.zeros([], dtype=tl.int64)
        while k0 < count:
            ks = k0 + tl.arange(0, RBLOCK).to(tl.int64)
            kmask = ks < count
            rows = 3 * (first + ks)
            acc_a += tl.load(partials + rows + 0, mask=kmask, other=0.0).to(tl.float64)
            acc_b += tl.load(partials + rows + 1, mask=kmask, other=0.0).to(tl.float64)
            acc_c += tl.load(partials + rows + 2, mask=kmask, other=0.0).to(tl.float64)
            k0 += RBLOCK
        a = tl.sum(acc_a, axis=0)
        b = tl.sum(acc_b, axis=0)
        c = tl.sum(acc_c, axis=0)
        if SHARDED:  # the sums of a shard: alpha waits for the other shards' (optim/sharded.py)
            tl.store(shard_sums + 3 * t + 0, a)
            tl.store(shard_sums + 3 * t + 1, b)
            tl.store(shard_sums + 3 * t + 2, c)
            return
        # scale arrives as an fp32 pair (hi + lo == the Python float), so alpha is formed from
        # the very double the other backends use.
        scale = tl.cast(scale_hi, tl.float64) + tl.cast(scale_lo, tl.float64)
        if MEAN_NORMS:  # norms="mean": the L1 means, the sums over the tensor's element count
            elements = tl.load(numels + t).to(tl.float64)
            a = a / elements
            b = b / elements
            c = c / elements
        candidate = scale * (1.0 + b) / (a * c)
        # NaN compares false, so 0/0 and non-finite gradients fall back too (docs/spec.md section 2).
        adaptive = (candidate > 0.0) & (candidate < 1.0) & (fresh == 0)
        alpha = tl.where(adaptive, candidate, tl.cast(base_weight, tl.float64))
        tl.store(alpha_ptr, alpha.to(tl.float32))
        tl.store(flag_ptr, (adaptive == 0).to(tl.int8))
        if DEFER:  # this step's blend waits for the next step or a flush (none on a first step)
            pending_ptr = _addr(table, PENDING, t, n_tensors).to(tl.pointer_type(tl.int8))
            tl.store(pending_ptr, (fresh == 0).to(tl.int8))


@triton.jit
def _blend_blocks(
    table, numels, block_tensor, block_start, fresh_marks, n_tensors, found_inf_ptr,
    PDT: tl.constexpr, EDT: tl.constexpr, HAS_FOUND_INF: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if HAS_FOUND_INF:
        if tl.load(found_inf_ptr) != 0:
            return
    b, t, offs, mask, full = _block(numels, block_tensor, block_start, BLOCK)
    if tl.load(fresh_marks + t) != 0:  # first LLaCA step: ema was set to p in pass 1
        return
    _blend_block(table, t, offs, mask, full, n_tensors, PDT, EDT, ALIGNED)


@triton.jit
def _blend_block(table, t, offs, mask, full, n_tensors, PDT: tl.constexpr, EDT: tl.constexpr,
                 ALIGNED: tl.constexpr):
    """ema <- ema + alpha (p - ema) on one block: pass 3, and the flush of a deferred blend."""
    if full:
        _blend_elements(table, t, offs, mask, n_tensors, PDT, EDT, ALIGNED, False)
    else:
        _blend_elements(table, t, offs, mask, n_tensors, PDT, EDT, ALIGNED, True)


@triton.jit
def _blend_elements(table, t, offs, mask, n_tensors, PDT: tl.constexpr, EDT: tl.constexpr,
                    ALIGNED: tl.constexpr, MASKED: tl.constexpr):
    p_ptr = _array(table, P, t, n_tensors, PDT, ALIGNED)
    ema_ptr = _array(table, EMA, t, n_tensors, EDT, ALIGNED)
    alpha = tl.load(_addr(table, ALPHA, t, n_tensors).to(tl.pointer_type(tl.float32)))
    p = _ld(p_ptr + offs, mask, MASKED).to(tl.float32)
    e = _ld(ema_ptr + offs, mask, MASKED).to(tl.float32)
    _st(ema_ptr + offs, _narrow((e + alpha * (p - e)), EDT), mask, MASKED)


@triton.jit
def _flush_blocks(
    table, numels, block_tensor, block_start, n_tensors,
    PDT: tl.constexpr, EDT: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):
    """The pending blends, one program per block; ``_clear_pending`` runs after it."""
    b, t, offs, mask, full = _block(numels, block_tensor, block_start, BLOCK)
    if tl.load(_addr(table, PENDING, t, n_tensors).to(tl.pointer_type(tl.int8))) == 0:
        return
    _blend_block(table, t, offs, mask, full, n_tensors, PDT, EDT, ALIGNED)


@triton.jit
def _clear_pending(table, n_tensors):
    t = tl.program_id(0).to(tl.int64)
    tl.store(_addr(table, PENDING, t, n_tensors).to(tl.pointer_type(tl.int8)), tl.zeros((), tl.int8))
