// What the host hands the CUDA kernels: the per-tensor table, the call's scalars, and the shape of
// a chunk. Plain data, shared by the kernels (kernels.cuh), the host side (workspace.h, ops.h) and
// the CPU emulation the tests run the kernels through (tests/cuda_sim/).
//
// NOTE [CUDA work decomposition]
// A call covers the tensors of one (device, dtype) bucket. Each tensor is cut into chunks of
// kChunk<param_t> elements (at least one chunk, so an empty tensor still gets its step count and
// alpha); the chunks of all tensors are numbered in tensor order and each is one thread block of
// the step kernel, which finds its tensor by binary search in `chunk_begin`.
//   * Step kernel (every chunk): AdamW, then the LLaCA sums a, b, c of the chunk, g_prev <- g, and
//     ema <- p on a tensor's first LLaCA step. A tensor of one chunk is finished by its block:
//     alpha from the block's sums, then the blend from the values still in registers, so p and
//     ema cross the memory bus once (docs/spec.md section 5's 11 accesses). A tensor of several chunks
//     writes one partial per chunk; the block that arrives last (a per-tensor arrival counter)
//     adds the partials in chunk order, whichever block that is, and writes alpha.
//   * Blend kernel (chunks of multi-chunk tensors only, launched only when there are some):
//     ema <- ema + alpha (p - ema), except on a tensor's first LLaCA step (ema was just set to p,
//     and the reference does not blend then: an inf parameter would turn its EMA into NaN).
//     Those tensors cost 13 accesses (the two-phase design); the
//     blocks run in reverse chunk order, so they start on the data the step kernel wrote last,
//     the part most likely still in L2.
// With deferral (the fused step given `ema_pending` flags, NOTE [CUDA deferred blend] below) the
// blend kernel is not launched at all: the step kernel is the only pass over memory.
// Sums are fp32 within a block (a fixed shuffle tree) and fp64 across the chunks of a tensor in
// chunk order: the same bits run after run. The arrival counters are reset by the last block, so
// the workspace needs no clearing between steps or graph replays.
//
// NOTE [CUDA deferred blend]
// docs/spec.md section 5's single pass for tensors too large to keep on chip: the blend of step t waits for
// step t + 1, which reads p_t and ema_{t-1} anyway. Per tensor, a one-byte device flag says that
// its blend is pending, with the alpha of that step in its alpha slot. A step kernel block reads
// the flag and alpha on entry and, if set, forms ema_t = ema_{t-1} + alpha_t (p_t - ema_{t-1})
// (rounded to the EMA's dtype) before the AdamW update overwrites p_t, stores it, and reduces
// |p_{t+1} - ema_t| against it; the block that finishes the tensor writes alpha_{t+1} and sets the
// flag again (a multi-chunk tensor after any step but its first LLaCA step, which sets ema <- p and
// has no blend). Single-chunk tensors blend on chip and clear the flag. The blend is the same
// expression on the same stored values as the blend kernel's, so the EMA after a flush has the
// same bits as without deferral. `llaca_flush_` applies and clears pending blends; the optimizer
// runs it before anything reads an EMA. The flags live on the device, so a flush between CUDA
// graph replays is seen by the next replay, and an AMP-skipped step leaves them as they were.
//
// NOTE [CUDA sharded mode]
// With `shard_sums` (llaca_optim/ops/library.py) the tensors are shards of larger ones, so a tensor's
// alpha needs sums from other GPUs. The block that would compute alpha (a single-chunk tensor's
// block, a multi-chunk tensor's last block) writes the tensor's sums to its row instead, and
// touches neither alpha, fallback flag nor pending flag; no block blends this step's EMA and the
// blend kernel is not launched. A blend pending on entry is applied as always (and stored, even
// by a single-chunk tensor). The caller reduces the rows, sets alphas and pending flags, and the
// next step or llaca_flush_ blends.
//
// NOTE [CUDA loads before stores]
// Every array is reached through the per-tensor table, so the compiler cannot tell that a store
// to one array leaves another unchanged: it keeps the program's order of loads and stores, and a
// load written after a store is issued only after it. That store waits for the values computed
// from the loads before it, so each group of loads that follows a store costs one more memory
// round trip. A thread therefore issues all loads of a 16-byte fragment (g, p, m, v, ema, g_prev)
// before the fragment's first store: ptxas then fetches them in one round trip per fragment (the
// step kernel had up to three: g, p, m, v; then g_prev after the AdamW stores; with a pending
// blend, m and v after the EMA store). The exception is amsgrad: with max_exp_avg_sq loaded up
// front too, the 16-bit kernels need more than the 128 registers that keep two blocks per SM
// and spilled, so amsgrad kernels load g_prev after their stores. The blend and flush kernels
// load all fragments of a thread first. tests/toolchain/test_cuda_compile.py counts the runs of loads
// between stores in the machine code (cuobjdump -sass) of every kernel. The Triton step kernel
// does the same, address-table reads included (tests/toolchain/triton_compile_check.py).
#pragma once

#include <cstdint>

#include "llaca/roles.h"

namespace llaca {
namespace cuda {

#if defined(LLACA_CUDA_SIM)
// The emulation runs each thread block as fibers on one CPU thread: small blocks keep it fast and
// make the tests' tensors span many chunks; a 4-lane "warp" still exercises the cross-warp step.
constexpr int kThreads = 16;
constexpr int kWarp = 4;
#else
constexpr int kThreads = 256;
constexpr int kWarp = 32;
#endif
constexpr int kWarps = kThreads / kWarp;
static_assert(kWarps <= kWarp, "the block reductions finish the per-warp sums in one warp");
constexpr int kVecBytes = 16;  // one 128-bit load or store
// Elements per thread and chunk, whatever the dtype: 4 (fp32) or 2 (16-bit) 16-byte fragments per
// array and thread, one after the other (NOTE [CUDA loads before stores]), and a register budget
// (a single-chunk tensor keeps p and ema of all of them until its alpha is known) that leaves
// room for two blocks per SM.
constexpr int kElemsPerThread = 16;

template <typename param_t>
constexpr int kVecElems = kVecBytes / static_cast<int>(sizeof(param_t));
template <typename param_t>
constexpr int kVecsPerThread = kElemsPerThread / kVecElems<param_t>;
template <typename param_t>
constexpr int64_t kChunk = int64_t(kThreads) * kElemsPerThread;

// One row per tensor: a pointer per role (llaca/roles.h: param, grad, exp_avg, exp_avg_sq,
// max_exp_avg_sq, step, ema, prev_grad, alpha (< 0 on entry: the tensor's first LLaCA step),
// alpha_fell_back, pending (the deferred blend, NOTE [CUDA deferred blend]; null: blend within the
// call)), null where the call does not use the role, and the tensor's size.
struct TensorMeta : Pointers {
  int64_t numel;
  int32_t num_chunks;
  int32_t vectorized;  // every array 16-byte aligned: 128-bit loads and stores
};

// Everything a kernel reads besides the tensors. Passed by value (kernel parameter space).
struct StepArgs {
  const TensorMeta* metas;
  const int64_t* chunk_begin;        // [n_tensors + 1]: first chunk of each tensor, then the total
  int32_t n_tensors;
  int32_t n_split;                   // tensors of more than one chunk
  const int32_t* split_tensors;      // [n_split]: their indices
  const int64_t* split_chunk_begin;  // [n_split + 1]: their chunks, numbered among themselves
  uint32_t* arrivals;                // [n_tensors]: blocks of the tensor done (0 between calls)
  float* partials;                   // [3 * chunks]: a, b, c of each chunk of a split tensor
  uint8_t* fresh;                    // [n_tensors]: first LLaCA step this call (for the blend)
  // AdamW. lr_ptr, when set, overrides lr (a tensor learning rate read on the device).
  double lr;
  const void* lr_ptr;
  int32_t lr_is_double;
  int32_t maximize;
  double beta1, beta2, weight_decay, eps;
  // AMP: grads are divided by *grad_scale; a call with *found_inf != 0 changes nothing.
  const float* grad_scale;
  const float* found_inf;
  // LLaCA.
  double scale, base_weight;
  int32_t mean_norms;  // norms="mean": the sums are divided by the tensor's size
  // Sharded mode (NOTE [CUDA sharded mode]): [3 * n_tensors] local sums out; null otherwise.
  double* shard_sums;
};

// The size of a call's two launches and the flags that pick the kernels' template arguments.
struct CallShape {
  int64_t chunks = 0;        // blocks of the step kernel
  int64_t split_chunks = 0;  // blocks of the blend kernel
  bool adamw = false, amsgrad = false, llaca = false, ema_fp32 = true;
  bool defer = false;  // the step leaves multi-chunk blends pending: no blend launch
  bool flush = false;  // the call is llaca_flush_: only the flush kernel runs
  bool sharded = false;  // sums out, no alpha and no blend (NOTE [CUDA sharded mode])
};

}  // namespace cuda
}  // namespace llaca
