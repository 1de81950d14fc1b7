// The CUDA kernels of the llaca_optim ops: the fused AdamW + LLaCA step and the standalone LLaCA
// update over all tensors of a bucket, in one or two launches whatever the number of tensors
// (NOTE [CUDA work decomposition] in kernel_args.h), and the flush of deferred blends.
//
// Layers, as in torch's fused optimizers: element math (llaca/math.h, shared with the CPU
// kernels), fragment loads and stores (this file), the kernels (this file), the launcher
// (`launch_call` below, given a Launcher that either launches on a GPU or emulates one) and the
// op with its checks and workspace (ops.h).
//
// This file is compiled by nvcc for the GPU and, with tests/cuda_sim/cuda_sim.h included first,
// by the host compiler for the tests' CPU emulation; hence the few LLACA_* spellings below.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "kernel_args.h"
#include "llaca/math.h"

#if defined(__CUDACC__)
#define LLACA_DEVICE __device__ __forceinline__
#define LLACA_LDCG(ptr) __ldcg(ptr)
// The tensors' addresses come from the table in memory, so the compiler cannot tell they are
// global memory and would emit generic loads (ld.v4 rather than ld.global.v4): say so.
#define LLACA_ASSUME_GLOBAL(ptr) __builtin_assume(__isGlobal(ptr))
#elif defined(LLACA_CUDA_SIM)
#define LLACA_DEVICE inline
#define LLACA_LDCG(ptr) (*(ptr))
#define LLACA_ASSUME_GLOBAL(ptr) ((void)0)
#else
#error "kernels.cuh is compiled by nvcc, or for the CPU emulation with LLACA_CUDA_SIM defined"
#endif

namespace llaca {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Storage types <-> fp32. Conversions are c10's own (round to nearest even, NaN kept), so the
// kernels store exactly what torch's element-wise ops would.

template <typename T>
struct Storage;

template <>
struct Storage<float> {
  static constexpr int kPerWord = 1;
  static LLACA_DEVICE float unpack(uint32_t word, int) { return __uint_as_float(word); }
  static LLACA_DEVICE uint32_t pack(const float* x) { return __float_as_uint(x[0]); }
};

// bf16 and fp16: two per 32-bit word, converted through the c10 type from and to its bits.
template <typename T>
struct Storage16 {
  static constexpr int kPerWord = 2;
  static LLACA_DEVICE float unpack(uint32_t word, int k) {
    return static_cast<float>(T(static_cast<uint16_t>(word >> (16 * k)), T::from_bits()));
  }
  static LLACA_DEVICE uint32_t pack(const float* x) {
    return uint32_t(T(x[0]).x) | (uint32_t(T(x[1]).x) << 16);
  }
};

template <>
struct Storage<c10::BFloat16> : Storage16<c10::BFloat16> {};
template <>
struct Storage<c10::Half> : Storage16<c10::Half> {};

// The value a parameter holds once stored: what LLaCA must see (rounding included).
template <typename T>
LLACA_DEVICE float round_trip(float x) {
  return static_cast<float>(T(x));
}

// N consecutive elements starting at element e0 of `base`, `valid` of which exist (the rest read
// as 0 and are never written). With `vec` (the array is 16-byte aligned, checked on the host; e0
// is a multiple of N, so the address is too) a whole fragment moves as 128-bit accesses.
template <typename T, int N>
LLACA_DEVICE void load(float (&out)[N], const void* base, int64_t e0, int valid, bool vec) {
  LLACA_ASSUME_GLOBAL(base);
  const T* ptr = static_cast<const T*>(base) + e0;
  if (vec && valid == N) {
    constexpr int kWords = N / Storage<T>::kPerWord;
    static_assert(kWords % 4 == 0, "fragments are whole 16-byte vectors");
#pragma unroll
    for (int q = 0; q < kWords / 4; ++q) {
      const uint4 w = reinterpret_cast<const uint4*>(ptr)[q];
      const uint32_t words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int k = 0; k < Storage<T>::kPerWord; ++k) {
          out[(4 * q + i) * Storage<T>::kPerWord + k] = Storage<T>::unpack(words[i], k);
        }
      }
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = k < valid ? static_cast<float>(ptr[k]) : 0.0f;
  }
}

template <typename T, int N>
LLACA_DEVICE void store(void* base, const float (&in)[N], int64_t e0, int valid, bool vec) {
  LLACA_ASSUME_GLOBAL(base);
  T* ptr = static_cast<T*>(base) + e0;
  if (vec && valid == N) {
    constexpr int kWords = N / Storage<T>::kPerWord;
#pragma unroll
    for (int q = 0; q < kWords / 4; ++q) {
      uint32_t words[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) words[i] = Storage<T>::pack(&in[(4 * q + i) * Storage<T>::kPerWord]);
      reinterpret_cast<uint4*>(ptr)[q] = make_uint4(words[0], words[1], words[2], words[3]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      if (k < valid) ptr[k] = T(in[k]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Deterministic block reductions: an xor-shuffle tree within each warp (every lane ends with the
// same total, since each step adds the same two values in either order), then the per-warp totals
// in warp order by the first warp. The result is valid in every thread of warp 0.

template <typename T>
LLACA_DEVICE T warp_sum(T x) {
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset, kWarp);
  return x;
}

template <typename T>
LLACA_DEVICE void block_sum3(T& a, T& b, T& c) {
  __shared__ T per_warp[3][kWarps];
  a = warp_sum(a);
  b = warp_sum(b);
  c = warp_sum(c);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  if (lane == 0) {
    per_warp[0][warp] = a;
    per_warp[1][warp] = b;
    per_warp[2][warp] = c;
  }
  __syncthreads();
  if (warp == 0) {
    a = warp_sum(lane < kWarps ? per_warp[0][lane] : T(0));
    b = warp_sum(lane < kWarps ? per_warp[1][lane] : T(0));
    c = warp_sum(lane < kWarps ? per_warp[2][lane] : T(0));
  }
  __syncthreads();  // per_warp may be reused by the caller's next reduction
}

// The tensor that chunk `chunk` belongs to: the last t with begin[t] <= chunk (begin ascending,
// begin[0] == 0). Every thread of the block searches the same small table (cached, uniform).
LLACA_DEVICE int32_t find_tensor(const int64_t* begin, int32_t n, int64_t chunk) {
  int32_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const int32_t mid = (lo + hi + 1) / 2;
    if (begin[mid] <= chunk) lo = mid;
    else hi = mid - 1;
  }
  return lo;
}

// A deferred-blend flag (NOTE [CUDA deferred blend] in kernel_args.h); the pointer may be null, so
// the global-memory promise is made only where it is dereferenced.
LLACA_DEVICE bool flag_set(const uint8_t* flag) {
  LLACA_ASSUME_GLOBAL(flag);
  return *flag != 0;
}
LLACA_DEVICE void set_flag(uint8_t* flag, bool value) {
  LLACA_ASSUME_GLOBAL(flag);
  *flag = value;
}

// One tensor's row of the sharded mode's sums (NOTE [CUDA sharded mode] in kernel_args.h).
LLACA_DEVICE void write_sums(double* row, double a, double b, double c) {
  LLACA_ASSUME_GLOBAL(row);
  row[0] = a;
  row[1] = b;
  row[2] = c;
}

LLACA_DEVICE bool overflowed(const StepArgs& args) {
  return args.found_inf != nullptr && *args.found_inf != 0.0f;
}

LLACA_DEVICE double learning_rate(const StepArgs& args) {
  if (args.lr_ptr == nullptr) return args.lr;
  return args.lr_is_double ? *static_cast<const double*>(args.lr_ptr)
                           : static_cast<double>(*static_cast<const float*>(args.lr_ptr));
}

// ---------------------------------------------------------------------------------------------
// The step kernel: one block per chunk (see NOTE [CUDA work decomposition] in kernel_args.h).

template <typename param_t, typename ema_t, bool ADAMW, bool AMSGRAD, bool LLACA>
__global__ void __launch_bounds__(kThreads) step_chunks(StepArgs args) {
  constexpr int W = kVecElems<param_t>;
  constexpr int kPerThread = kElemsPerThread;
  __shared__ float alpha_shared;
  __shared__ int last_shared;
  if (overflowed(args)) return;

  const int64_t chunk = blockIdx.x;
  const int32_t t = find_tensor(args.chunk_begin, args.n_tensors, chunk);
  const TensorMeta meta = args.metas[t];  // a copy: its pointers stay in registers
  const int64_t numel = meta.numel;
  const bool single = meta.num_chunks == 1;
  const bool vec = meta.vectorized != 0;
  const int64_t start = (chunk - args.chunk_begin[t]) * kChunk<param_t>;
  if (ADAMW) LLACA_ASSUME_GLOBAL(meta.step);
  if (LLACA) {
    LLACA_ASSUME_GLOBAL(meta.alpha);
    LLACA_ASSUME_GLOBAL(meta.alpha_fell_back);
  }
  // Read before the block (or the tensor's last block) overwrites them below.
  const bool fresh = LLACA && *meta.alpha < 0.0f;
  // A blend deferred from the last step (NOTE [CUDA deferred blend] in kernel_args.h) and its alpha.
  const bool pending = LLACA && meta.pending != nullptr && flag_set(meta.pending);
  const float pending_alpha = pending ? *meta.alpha : 0.0f;
  // NOTE [CUDA sharded mode] in kernel_args.h: sums out instead of alpha, no blend of this step.
  const bool sharded = LLACA && args.shard_sums != nullptr;
  const float step = ADAMW ? *meta.step + 1.0f : 0.0f;
  AdamWScalars s{};
  if (ADAMW) {
    s = adamw_scalars(learning_rate(args), args.beta1, args.beta2, args.weight_decay, args.eps,
                      static_cast<double>(step));
  }
  const float grad_scale = args.grad_scale != nullptr ? *args.grad_scale : 1.0f;
  const float sign = args.maximize ? -1.0f : 1.0f;

  // A single-chunk tensor keeps its stepped parameter and its EMA here until alpha is known.
  float kept_p[kPerThread];
  float kept_e[kPerThread];
  float sum_a = 0.0f, sum_b = 0.0f, sum_c = 0.0f;
#pragma unroll
  for (int j = 0; j < kVecsPerThread<param_t>; ++j) {
    const int64_t e0 = start + (int64_t(j) * kThreads + threadIdx.x) * W;
    const int64_t left = numel - e0;
    const int valid = left <= 0 ? 0 : (left >= W ? W : static_cast<int>(left));
    // Every load of the fragment is issued before its first store: the arrays come from a table,
    // so the compiler must assume a store may alias a later load and would otherwise wait for the
    // stores (NOTE [CUDA loads before stores] in kernel_args.h).
    float g[W], p[W], e[W], m[W], v[W], vmax[W], gp[W];
    load<param_t, W>(g, meta.grad, e0, valid, vec);
    load<param_t, W>(p, meta.param, e0, valid, vec);
    if (ADAMW) {
      load<param_t, W>(m, meta.exp_avg, e0, valid, vec);
      load<param_t, W>(v, meta.exp_avg_sq, e0, valid, vec);
      if (AMSGRAD) load<param_t, W>(vmax, meta.max_exp_avg_sq, e0, valid, vec);
    }
    if (LLACA && !fresh) {
      load<ema_t, W>(e, meta.ema, e0, valid, vec);
      // amsgrad's extra array leaves no registers for this one here in the 16-bit kernels
      // (ptxas keeps them to 128, two blocks per SM, and spilled): it is loaded after the stores.
      if (!AMSGRAD) load<param_t, W>(gp, meta.prev_grad, e0, valid, vec);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) g[k] = g[k] / grad_scale;  // as torch's unscale_: a division
    if (LLACA && !fresh && pending) {
      // The last step's blend, from p_t before the AdamW update below replaces it; rounded as it
      // would have been stored.
#pragma unroll
      for (int k = 0; k < W; ++k) e[k] = round_trip<ema_t>(e[k] + pending_alpha * (p[k] - e[k]));
      // A tensor finished here stores its EMA once, after this step's blend.
      if (!single || sharded) store<ema_t, W>(meta.ema, e, e0, valid, vec);
    }
    if (ADAMW) {
#pragma unroll
      for (int k = 0; k < W; ++k) {
        adamw_element<AMSGRAD>(p[k], sign * g[k], m[k], v[k], vmax[k], s);
        p[k] = round_trip<param_t>(p[k]);  // LLaCA sees the parameter as stored
      }
      store<param_t, W>(meta.param, p, e0, valid, vec);
      store<param_t, W>(meta.exp_avg, m, e0, valid, vec);
      store<param_t, W>(meta.exp_avg_sq, v, e0, valid, vec);
      if (AMSGRAD) store<param_t, W>(meta.max_exp_avg_sq, vmax, e0, valid, vec);
    }
    if (LLACA) {
      if (fresh) {
        store<ema_t, W>(meta.ema, p, e0, valid, vec);
      } else {
        if (AMSGRAD) load<param_t, W>(gp, meta.prev_grad, e0, valid, vec);
#pragma unroll
        for (int k = 0; k < W; ++k) {
          // Elements past the end load as zeros on every side, so they add nothing.
          sum_a += fabsf(p[k] - e[k]);
          sum_b += fabsf(g[k]);
          sum_c += fabsf(g[k] - gp[k]);
          kept_p[j * W + k] = p[k];
          kept_e[j * W + k] = e[k];
        }
      }
      // The unscaled gradient is what the next step compares against.
      store<param_t, W>(meta.prev_grad, g, e0, valid, vec);
    }
  }

  // Every thread has read the step count and the alpha slot before anyone overwrites them: the
  // reductions below synchronise the block, and a multi-chunk tensor's other blocks have arrived
  // (after their reads) before its last block writes.
  if (!LLACA) {
    __syncthreads();
    if (single) {
      if (threadIdx.x == 0 && ADAMW) *meta.step = step;
      return;
    }
  } else {
    block_sum3(sum_a, sum_b, sum_c);
    if (single) {
      if (threadIdx.x == 0) {
        if (ADAMW) *meta.step = step;
        if (sharded) write_sums(args.shard_sums + 3 * t, sum_a, sum_b, sum_c);
      }
      if (sharded) return;  // uniform across the block: its alpha needs the other shards' sums
      if (threadIdx.x == 0) {
        if (meta.pending != nullptr) set_flag(meta.pending, false);  // blended below, or fresh
        float alpha;
        const double elements = args.mean_norms ? static_cast<double>(meta.numel) : 1.0;
        *meta.alpha_fell_back = tensor_alpha(fresh, sum_a, sum_b, sum_c, elements, args.scale,
                                       args.base_weight, alpha);
        *meta.alpha = alpha;
        alpha_shared = alpha;
      }
      __syncthreads();
      if (fresh) return;  // ema <- p was stored above
      const float alpha = alpha_shared;
#pragma unroll
      for (int j = 0; j < kVecsPerThread<param_t>; ++j) {
        const int64_t e0 = start + (int64_t(j) * kThreads + threadIdx.x) * W;
        const int64_t left = numel - e0;
        const int valid = left <= 0 ? 0 : (left >= W ? W : static_cast<int>(left));
        float e[W];
#pragma unroll
        for (int k = 0; k < W; ++k) {
          e[k] = kept_e[j * W + k] + alpha * (kept_p[j * W + k] - kept_e[j * W + k]);
        }
        store<ema_t, W>(meta.ema, e, e0, valid, vec);
      }
      return;
    }
    if (threadIdx.x == 0) {
      float* slot = args.partials + 3 * chunk;
      slot[0] = sum_a;
      slot[1] = sum_b;
      slot[2] = sum_c;
    }
  }

  // A chunk of a multi-chunk tensor: the block that arrives last finishes the tensor.
  if (threadIdx.x == 0) {
    __threadfence();  // this block's partials (and reads) before its arrival
    const uint32_t arrived = atomicAdd(args.arrivals + t, 1u) + 1u;
    last_shared = arrived == static_cast<uint32_t>(meta.num_chunks);
  }
  __syncthreads();
  if (!last_shared) return;
  if (threadIdx.x == 0) {
    if (ADAMW) *meta.step = step;
    if (LLACA) args.fresh[t] = fresh;
    // This blend waits (in the sharded mode the caller sets the flag, once alpha is known).
    if (LLACA && meta.pending != nullptr && !sharded) set_flag(meta.pending, !fresh);
    args.arrivals[t] = 0;  // ready for the next call or graph replay
  }
  if (!LLACA) return;
  __threadfence();
  const int64_t first = args.chunk_begin[t];
  double a = 0.0, b = 0.0, c = 0.0;
  for (int64_t k = threadIdx.x; k < meta.num_chunks; k += kThreads) {
    // __ldcg: from L2, where the other blocks' partials are; this SM's L1 may not have seen them.
    const float* slot = args.partials + 3 * (first + k);
    a += LLACA_LDCG(slot + 0);
    b += LLACA_LDCG(slot + 1);
    c += LLACA_LDCG(slot + 2);
  }
  block_sum3(a, b, c);
  if (threadIdx.x == 0 && sharded) write_sums(args.shard_sums + 3 * t, a, b, c);
  if (threadIdx.x == 0 && !sharded) {
    float alpha;
    const double elements = args.mean_norms ? static_cast<double>(meta.numel) : 1.0;
    *meta.alpha_fell_back =
        tensor_alpha(fresh, a, b, c, elements, args.scale, args.base_weight, alpha);
    *meta.alpha = alpha;
  }
}

// ema <- ema + alpha (p - ema) over one chunk of a tensor, from its alpha slot: the second phase
// of the two-phase design and the flush of a deferred blend (the same expression as the step
// kernel's on-chip and deferred blends, so every path stores the same bits).
template <typename param_t, typename ema_t>
LLACA_DEVICE void blend_chunk(const TensorMeta& meta, int64_t start) {
  constexpr int W = kVecElems<param_t>;
  const bool vec = meta.vectorized != 0;
  LLACA_ASSUME_GLOBAL(meta.alpha);
  const float alpha = *meta.alpha;
  // p and ema of every fragment of the thread, all loaded before the first store (NOTE [CUDA
  // loads before stores] in kernel_args.h); elements past the end load as zeros and are never stored.
  constexpr int kVecs = kVecsPerThread<param_t>;
  float p[kVecs][W], e[kVecs][W];
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int64_t e0 = start + (int64_t(j) * kThreads + threadIdx.x) * W;
    const int64_t left = meta.numel - e0;
    const int valid = left <= 0 ? 0 : (left >= W ? W : static_cast<int>(left));
    load<param_t, W>(p[j], meta.param, e0, valid, vec);
    load<ema_t, W>(e[j], meta.ema, e0, valid, vec);
  }
#pragma unroll
  for (int j = 0; j < kVecs; ++j) {
    const int64_t e0 = start + (int64_t(j) * kThreads + threadIdx.x) * W;
    const int64_t left = meta.numel - e0;
    if (left <= 0) break;
    const int valid = left >= W ? W : static_cast<int>(left);
#pragma unroll
    for (int k = 0; k < W; ++k) e[j][k] = e[j][k] + alpha * (p[j][k] - e[j][k]);
    store<ema_t, W>(meta.ema, e[j], e0, valid, vec);
  }
}

// The blend of the multi-chunk tensors: ema <- ema + alpha (p - ema), one block per chunk, in
// reverse chunk order; skipped on a tensor's first LLaCA step (the step kernel set ema <- p).
template <typename param_t, typename ema_t>
__global__ void __launch_bounds__(kThreads) blend_chunks(StepArgs args) {
  if (overflowed(args)) return;
  const int64_t chunk = args.split_chunk_begin[args.n_split] - 1 - static_cast<int64_t>(blockIdx.x);
  const int32_t s = find_tensor(args.split_chunk_begin, args.n_split, chunk);
  const int32_t t = args.split_tensors[s];
  if (args.fresh[t]) return;
  const TensorMeta meta = args.metas[t];  // a copy: its pointers stay in registers
  blend_chunk<param_t, ema_t>(meta, (chunk - args.split_chunk_begin[s]) * kChunk<param_t>);
}

// llaca_flush_: the pending blends (NOTE [CUDA deferred blend] in kernel_args.h), one block per chunk
// of every tensor; tensors without a pending blend return at once. The flag is cleared by the
// tensor's last block to arrive, after every block has read it.
template <typename param_t, typename ema_t>
__global__ void __launch_bounds__(kThreads) flush_chunks(StepArgs args) {
  __shared__ int last_shared;
  const int64_t chunk = blockIdx.x;
  const int32_t t = find_tensor(args.chunk_begin, args.n_tensors, chunk);
  const TensorMeta meta = args.metas[t];  // a copy: its pointers stay in registers
  if (!flag_set(meta.pending)) return;  // the same answer in every block of the tensor
  blend_chunk<param_t, ema_t>(meta, (chunk - args.chunk_begin[t]) * kChunk<param_t>);
  __syncthreads();  // every thread of this block has read the flag
  if (threadIdx.x == 0) {
    if (meta.num_chunks == 1) {
      last_shared = 1;
    } else {
      __threadfence();
      last_shared = atomicAdd(args.arrivals + t, 1u) + 1u == static_cast<uint32_t>(meta.num_chunks);
    }
    if (last_shared) {
      set_flag(meta.pending, false);
      args.arrivals[t] = 0;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Launching. The flags of a call become template arguments here, once per call.

// Launcher: an object with `void operator()(kernel, int64_t blocks, const StepArgs&)`.
template <typename param_t, typename ema_t, bool ADAMW, bool AMSGRAD, bool LLACA, typename Launcher>
void launch_kernels(const CallShape& shape, const StepArgs& args, Launcher& launcher) {
  launcher(&step_chunks<param_t, ema_t, ADAMW, AMSGRAD, LLACA>, shape.chunks, args);
  if (LLACA && !shape.defer && !shape.sharded && shape.split_chunks > 0) {
    launcher(&blend_chunks<param_t, ema_t>, shape.split_chunks, args);
  }
}

template <typename param_t, typename ema_t, typename Launcher>
void launch_flags(const CallShape& shape, const StepArgs& args, Launcher& launcher) {
  if (shape.flush) {
    launcher(&flush_chunks<param_t, ema_t>, shape.chunks, args);
  } else if (!shape.adamw) {
    launch_kernels<param_t, ema_t, false, false, true>(shape, args, launcher);
  } else if (shape.amsgrad) {
    if (shape.llaca) launch_kernels<param_t, ema_t, true, true, true>(shape, args, launcher);
    else launch_kernels<param_t, ema_t, true, true, false>(shape, args, launcher);
  } else {
    if (shape.llaca) launch_kernels<param_t, ema_t, true, false, true>(shape, args, launcher);
    else launch_kernels<param_t, ema_t, true, false, false>(shape, args, launcher);
  }
}

// Every kernel of one parameter dtype: each dtype's instantiations live in their own translation
// unit (step_<dtype>.cu), so a build compiles them in parallel.
template <typename param_t, typename Launcher>
void launch_call(const CallShape& shape, const StepArgs& args, Launcher& launcher) {
  if (shape.ema_fp32 || !shape.llaca) launch_flags<param_t, float, Launcher>(shape, args, launcher);
  else launch_flags<param_t, param_t, Launcher>(shape, args, launcher);
}

}  // namespace cuda
}  // namespace llaca
