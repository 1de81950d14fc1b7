// CPU kernels of the llaca_optim ops: the fused AdamW + LLaCA step and the standalone LLaCA update,
// over lists of tensors, registered for the CPU dispatch key under the schemas declared in
// llaca_optim/ops/library.py.
//
// NOTE [CPU work decomposition]
// Sums are taken over fixed blocks of kSumBlock elements: fp32 inside a block, then double over the
// blocks of a tensor in block order. Block boundaries do not depend on the thread count and there
// are no atomics, so the reductions give the same bits run after run and for any number of threads.
// The work of one call is a list of items, spread over the intra-op threads by element count:
//   * a tensor of at most kWholeTensorLimit elements is one item. Its thread does the AdamW step
//     and the sums a = sum|p - ema|, b = sum|g|, c = sum|g - g_prev| (and g_prev <- g) block by
//     block, computes alpha, then blends ema <- ema + alpha (p - ema) while p and ema are still in
//     L2/L3: one trip to memory for the tensor (docs/spec.md section 5's "on chip" design).
//   * a larger tensor is split into one item per block, shared by all threads (pass 1: AdamW and
//     block sums into per-item slots); then its alpha (pass 2, serial: add the slots in order) and
//     the blend (pass 3, parallel, each thread walking its share backwards so it starts on the data
//     it touched last). Without deferral these tensors pay the two-phase cost of 13 memory
//     accesses per element.
// Scratch (the work list and the partial-sum slots) is thread-local, grown once and reused.
// In the sharded mode (`shard_sums` given, llaca_optim/ops/library.py) every tensor stops after its sums:
// they are written to its row, and no alpha is computed and nothing blended; llaca_flush_ blends
// once the caller has reduced the sums across the shards and set the alphas and pending flags.
//
// NOTE [CPU deferred blend]
// The design of NOTE [CUDA deferred blend] (csrc/cuda/kernel_args.h), given `ema_pending` flags: a split
// tensor skips pass 3 and sets its flag; its next step reads the flag and the old alpha before
// anything is written, and each block forms ema_t = ema_{t-1} + alpha_t (p_t - ema_{t-1}) from p_t
// before AdamW replaces it, stores it and sums against it. Large tensors then take 11 accesses
// per element too. Whole tensors still blend in their one visit (applying a pending blend first)
// and clear the flag. The same expression on the same stored values: bit-identical EMAs. The
// sharded mode uses the same entry path, its caller sets the flags.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "llaca/checks.h"
#include "llaca/math.h"
#include "convert.h"

namespace llaca {
namespace cpu {
namespace {

// Elements per partial sum. Fixed, so the reductions do not depend on the thread count.
constexpr int64_t kSumBlock = int64_t(1) << 15;
// Tensors up to this many elements are one work item, finished by one thread in one visit (see
// NOTE [CPU work decomposition]); larger ones are split into blocks shared by all threads.
// Chosen by measurement with benchmarks/ (lora_llama's 88k-element LoRA factors must fall below).
constexpr int64_t kWholeTensorLimit = int64_t(1) << 18;

// What a tensor's EMA holds on entry to a step: nothing yet (its first LLaCA step: it is set to
// the stepped p), the blend of its last step, or not yet that blend (NOTE [CPU deferred blend]).
enum class EmaOnEntry { kFresh, kCurrent, kPending };

// Everything one tensor contributes to a call, resolved to raw pointers once per step: one per
// role (llaca/roles.h; `pending` is its deferred-blend flag, null unless the call defers), and
// what the step works out for it.
struct TensorJob : Pointers {
  int64_t numel = 0;
  double* shard_sums = nullptr;  // sharded mode: this tensor's row of (a, b, c)
  EmaOnEntry entry = EmaOnEntry::kCurrent; // read from the alpha slot and the flag before anything is written
  bool whole = false;  // one work item: finished (alpha and blend) by the thread that stepped it
  AdamWScalars adamw{};
  int64_t first_item = 0;
  int64_t num_items = 0;

  bool fresh() const { return entry == EmaOnEntry::kFresh; }
};

struct Item {
  int64_t job;
  int64_t begin;
  int64_t end;
};

struct Workspace {
  std::vector<Item> items;
  std::vector<int64_t> item_ends;  // running element count at the end of each item
  std::vector<float> partials;     // three block sums per item of a split tensor
};

struct CallScalars {
  bool maximize = false;
  float grad_scale = 1.0f;
  double scale = 0.0;
  double base_weight = 0.0;
  bool mean_norms = false;  // norms="mean": the sums are divided by the tensor's size
  bool sharded = false;  // shard_sums given: sums out, no alpha, no blend
};

// Phase 1 on the elements [begin, end) of one tensor (at most one sum block). Returns the three
// partial L1 sums. ENTRY is a template parameter, not a branch in the loop: a conditional store
// inside the loop keeps GCC from vectorising it.
template <typename param_t, typename ema_t, bool ADAMW, bool AMSGRAD, bool LLACA, EmaOnEntry ENTRY>
void chunk_step(const TensorJob& job, int64_t begin, int64_t end, const CallScalars& call,
                float* partial) {
  using P = Codec<param_t>;
  using E = Codec<ema_t>;
  using praw = typename P::raw;
  using eraw = typename E::raw;
  praw* __restrict p = static_cast<praw*>(job.param);
  const praw* __restrict g = static_cast<const praw*>(job.grad);
  praw* __restrict m = static_cast<praw*>(job.exp_avg);
  praw* __restrict v = static_cast<praw*>(job.exp_avg_sq);
  praw* __restrict vmax = static_cast<praw*>(job.max_exp_avg_sq);
  eraw* __restrict ema = static_cast<eraw*>(job.ema);
  praw* __restrict gprev = static_cast<praw*>(job.prev_grad);
  const AdamWScalars s = job.adamw;
  const float sign = call.maximize ? -1.0f : 1.0f;
  // 1.0 without a GradScaler: x / 1.0f is exact, so dividing always keeps the loop free of a
  // branch that stopped GCC from vectorising it.
  const float grad_scale = call.grad_scale;
  // The alpha of a pending blend is still in the slot: the tensor's new alpha is written only
  // after every block of it has been stepped.
  const float pending_alpha = ENTRY == EmaOnEntry::kPending ? *job.alpha : 0.0f;
  constexpr bool FRESH = ENTRY == EmaOnEntry::kFresh;

  float sum_a = 0.0f, sum_b = 0.0f, sum_c = 0.0f;
#pragma omp simd reduction(+ : sum_a, sum_b, sum_c)
  for (int64_t i = begin; i < end; ++i) {
    // Division, not a multiply by the inverse: this is what torch's _amp_foreach_non_finite_check
    // _and_unscale_ does, and the reference does the same.
    const float gf = P::load(g[i]) / grad_scale;
    float pf = P::load(p[i]);
    float e = 0.0f;
    if (LLACA && !FRESH) {
      e = E::load(ema[i]);
      if (ENTRY == EmaOnEntry::kPending) {
        // The last step's blend, from p_t before the AdamW update replaces it (the expression of
        // chunk_blend, so the stored bits are the same).
        const eraw blended = E::store(e + pending_alpha * (pf - e));
        ema[i] = blended;
        e = E::load(blended);
      }
    }
    if (ADAMW) {
      float mf = P::load(m[i]);
      float vf = P::load(v[i]);
      float vmaxf = AMSGRAD ? P::load(vmax[i]) : 0.0f;
      adamw_element<AMSGRAD>(pf, sign * gf, mf, vf, vmaxf, s);
      const praw stored = P::store(pf);
      p[i] = stored;
      pf = P::load(stored);  // LLaCA sees the parameter as stored, rounding included
      m[i] = P::store(mf);
      v[i] = P::store(vf);
      if (AMSGRAD) vmax[i] = P::store(vmaxf);
    }
    if (LLACA) {
      // The unscaled gradient is what the next step compares against (docs/spec.md section 2: `g` is the gradient
      // after unscaling). Without a scaler this stores g unchanged (16-bit round trips are exact).
      const praw g_stored = P::store(gf);
      if (FRESH) {
        ema[i] = E::store(pf);
      } else {
        sum_a += std::fabs(pf - e);
        sum_b += std::fabs(gf);
        sum_c += std::fabs(gf - P::load(gprev[i]));
      }
      gprev[i] = g_stored;
    }
  }
  partial[0] = sum_a;
  partial[1] = sum_b;
  partial[2] = sum_c;
}

template <typename param_t, typename ema_t>
void chunk_blend(const TensorJob& job, int64_t begin, int64_t end) {
  using P = Codec<param_t>;
  using E = Codec<ema_t>;
  const typename P::raw* __restrict p = static_cast<const typename P::raw*>(job.param);
  typename E::raw* __restrict ema = static_cast<typename E::raw*>(job.ema);
  const float alpha = *job.alpha;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float e = E::load(ema[i]);
    ema[i] = E::store(e + alpha * (P::load(p[i]) - e));
  }
}

// Writes a tensor's alpha and fallback flag from its three whole-tensor sums, or in the sharded
// mode the sums themselves (its alpha waits for the other shards' sums). Returns whether the
// EMA may be blended now.
bool finish_alpha(const TensorJob& job, double a, double b, double c, const CallScalars& call) {
  if (job.shard_sums != nullptr) {
    job.shard_sums[0] = a;
    job.shard_sums[1] = b;
    job.shard_sums[2] = c;
    return false;
  }
  const double elements = call.mean_norms ? static_cast<double>(job.numel) : 1.0;
  *job.alpha_fell_back =
      tensor_alpha(job.fresh(), a, b, c, elements, call.scale, call.base_weight, *job.alpha);
  return true;
}

// Calls fn(std::integral_constant<EmaOnEntry, e>) for the tensor's entry state (kCurrent without LLaCA).
template <bool LLACA, typename Fn>
void with_entry(const TensorJob& job, Fn&& fn) {
  switch (LLACA ? job.entry : EmaOnEntry::kCurrent) {
    case EmaOnEntry::kFresh: return fn(std::integral_constant<EmaOnEntry, EmaOnEntry::kFresh>{});
    case EmaOnEntry::kPending: return fn(std::integral_constant<EmaOnEntry, EmaOnEntry::kPending>{});
    default: return fn(std::integral_constant<EmaOnEntry, EmaOnEntry::kCurrent>{});
  }
}

// A tensor small enough to be one work item: the AdamW step and the sums block by block, then its
// alpha, then the blend while p and ema are still in cache. The blend walks the blocks backwards,
// so the most recently touched block (the one surely still in L1/L2) comes first.
template <typename param_t, typename ema_t, bool ADAMW, bool AMSGRAD, bool LLACA, EmaOnEntry ENTRY>
void whole_tensor_step(const TensorJob& job, const CallScalars& call) {
  double a = 0.0, b = 0.0, c = 0.0;
  for (int64_t begin = 0; begin < job.numel; begin += kSumBlock) {
    float partial[3];
    chunk_step<param_t, ema_t, ADAMW, AMSGRAD, LLACA, ENTRY>(
        job, begin, std::min(job.numel, begin + kSumBlock), call, partial);
    a += partial[0];
    b += partial[1];
    c += partial[2];
  }
  if (!LLACA) return;
  if (!finish_alpha(job, a, b, c, call)) return;  // sharded: the caller blends, flags included
  if (job.pending != nullptr) *job.pending = false;  // blended below (or fresh: nothing to blend)
  if (ENTRY == EmaOnEntry::kFresh) return;
  const int64_t blocks = (job.numel + kSumBlock - 1) / kSumBlock;
  for (int64_t k = blocks - 1; k >= 0; --k) {
    chunk_blend<param_t, ema_t>(job, k * kSumBlock, std::min(job.numel, (k + 1) * kSumBlock));
  }
}

// Appends tensor j's blocks of kSumBlock elements to the work list.
void append_blocks(int64_t j, int64_t numel, std::vector<Item>& items,
                   std::vector<int64_t>& item_ends, int64_t& elements) {
  for (int64_t begin = 0; begin < numel; begin += kSumBlock) {
    const int64_t end = std::min(numel, begin + kSumBlock);
    items.push_back({j, begin, end});
    elements += end - begin;
    item_ends.push_back(elements);
  }
}

// Splits the items over the threads by element count, so one large tensor next to many small
// ones does not leave a thread idle. Any split gives the same result (NOTE [CPU work decomposition]).
// `backwards` walks each thread's share from its end: a second pass then starts on the data the
// first pass touched last, which is the most likely to still be in cache.
template <typename Fn>
void parallel_over_items(const std::vector<Item>& items, const std::vector<int64_t>& item_ends,
                         bool backwards, Fn&& fn) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  const int64_t total = item_ends.back();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  auto run_range = [&](int64_t first, int64_t last) {
    if (backwards) {
      for (int64_t k = last - 1; k >= first; --k) fn(k);
    } else {
      for (int64_t k = first; k < last; ++k) fn(k);
    }
  };
  if (threads == 1 || total < 2 * kSumBlock) {
    run_range(0, n);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t lo_elem = total * t / threads;
      const int64_t hi_elem = total * (t + 1) / threads;
      // items whose end lies in (lo_elem, hi_elem] belong to thread t
      int64_t first = std::upper_bound(item_ends.begin(), item_ends.end(), lo_elem) - item_ends.begin();
      int64_t last = std::upper_bound(item_ends.begin(), item_ends.end(), hi_elem) - item_ends.begin();
      if (t == threads - 1) last = n;
      run_range(first, last);
    }
  });
}

template <typename param_t, typename ema_t, bool ADAMW, bool AMSGRAD, bool LLACA>
void run_step(std::vector<TensorJob>& jobs, const CallScalars& call) {
  // Work list and scratch, reused from call to call (they grow, never shrink): a step allocates
  // nothing once the optimizer has seen its largest call. Bound to references because the lambdas
  // below run on other threads, where the names of thread_local variables denote other objects.
  static thread_local Workspace workspace;
  std::vector<Item>& items = workspace.items;
  std::vector<int64_t>& item_ends = workspace.item_ends;
  std::vector<float>& partials = workspace.partials;
  items.clear();
  item_ends.clear();
  int64_t elements = 0;
  bool any_split = false;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
    TensorJob& job = jobs[j];
    job.first_item = static_cast<int64_t>(items.size());
    job.whole = job.numel > 0 && job.numel <= kWholeTensorLimit;
    if (job.whole) {
      items.push_back({j, 0, job.numel});
      elements += job.numel;
      item_ends.push_back(elements);
    } else {
      append_blocks(j, job.numel, items, item_ends, elements);
      // Pass 3 runs for split tensors that blend within the call (not deferring, not sharded).
      any_split = any_split || (job.numel > 0 && job.pending == nullptr);
    }
    job.num_items = static_cast<int64_t>(items.size()) - job.first_item;
  }
  if (partials.size() < 3 * items.size()) partials.resize(3 * items.size());
  float* partial_data = partials.data();

  parallel_over_items(items, item_ends, /*backwards=*/false, [&](int64_t k) {
    const Item& item = items[k];
    const TensorJob& job = jobs[item.job];
    with_entry<LLACA>(job, [&](auto entry) {
      constexpr EmaOnEntry ENTRY = decltype(entry)::value;
      if (job.whole) {
        whole_tensor_step<param_t, ema_t, ADAMW, AMSGRAD, LLACA, ENTRY>(job, call);
      } else {
        chunk_step<param_t, ema_t, ADAMW, AMSGRAD, LLACA, ENTRY>(job, item.begin, item.end, call,
                                                                 partial_data + 3 * k);
      }
    });
  });
  if (!LLACA) return;

  // Tensors not finished in pass 1: the split ones (sum their block partials in order) and empty
  // ones (no item; their sums are zero, so they fall back).
  for (const TensorJob& job : jobs) {
    if (job.whole) continue;
    double a = 0.0, b = 0.0, c = 0.0;
    for (int64_t k = job.first_item; k < job.first_item + job.num_items; ++k) {
      a += partial_data[3 * k + 0];
      b += partial_data[3 * k + 1];
      c += partial_data[3 * k + 2];
    }
    // A deferring tensor's blend waits for its next step or a flush (none on its first step,
    // none for an empty tensor).
    if (finish_alpha(job, a, b, c, call) && job.pending != nullptr) {
      *job.pending = !job.fresh() && job.numel > 0;
    }
  }
  if (!any_split || call.sharded) return;
  parallel_over_items(items, item_ends, /*backwards=*/true, [&](int64_t k) {
    const Item& item = items[k];
    const TensorJob& job = jobs[item.job];
    if (!job.whole && !job.fresh() && job.pending == nullptr) {
      chunk_blend<param_t, ema_t>(job, item.begin, item.end);
    }
  });
}

// Checks the lists (llaca/checks.h) and fills the jobs from them; returns the EMA dtype.
at::ScalarType build_jobs(const Lists& l, bool adamw, bool amsgrad, bool llaca,
                          const std::optional<Tensor>& shard_sums, std::vector<TensorJob>& jobs,
                          CallScalars& call) {
  const at::ScalarType ema_dtype = check_lists(l, adamw, amsgrad, llaca, c10::DeviceType::CPU, "cpu");
  double* sum_rows = shard_sum_rows(shard_sums, l, llaca);
  call.sharded = sum_rows != nullptr;
  const int64_t n = static_cast<int64_t>(l.params.size());
  jobs.resize(n);
  const RolesInUse roles(l, adamw, amsgrad, llaca);
  for (int64_t i = 0; i < n; ++i) {
    TensorJob& job = jobs[i];
    job.numel = l.params[i].numel();
    point_at(job, roles, i);
    if (llaca) {
      // A negative alpha slot marks a tensor with no EMA step yet (see llaca_optim/ops/library.py).
      if (*job.alpha < 0.0f) job.entry = EmaOnEntry::kFresh;
      else if (job.pending != nullptr && *job.pending) job.entry = EmaOnEntry::kPending;
      if (sum_rows != nullptr) job.shard_sums = sum_rows + 3 * i;
    }
  }
  return ema_dtype;
}

template <bool ADAMW, bool AMSGRAD, bool LLACA>
void dispatch_dtypes(at::ScalarType param_dtype, at::ScalarType ema_dtype,
                     std::vector<TensorJob>& jobs, const CallScalars& call) {
  with_param_type(param_dtype, [&](auto t) {
    using param_t = typename decltype(t)::type;
    if (!LLACA || ema_dtype == at::kFloat) run_step<param_t, float, ADAMW, AMSGRAD, LLACA>(jobs, call);
    else run_step<param_t, param_t, ADAMW, AMSGRAD, LLACA>(jobs, call);
  });
}

// Reads the AMP tensors: true when this step must change nothing.
bool read_amp(const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
              CallScalars& call) {
  check_call_scalar(found_inf, "found_inf", c10::Device(c10::DeviceType::CPU));
  check_call_scalar(grad_scale, "grad_scale", c10::Device(c10::DeviceType::CPU));
  if (found_inf.has_value() && found_inf->defined() && found_inf->item<double>() != 0.0) return true;
  if (grad_scale.has_value() && grad_scale->defined()) call.grad_scale = grad_scale->item<float>();
  return false;
}

void adamw_llaca_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
                     TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList state_steps,
                     TensorList emas, TensorList prev_grads, TensorList alphas,
                     TensorList alpha_fell_backs, TensorList ema_pending, double lr, double beta1,
                     double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                     bool llaca, double scale, double base_weight, bool mean_norms,
                     const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& found_inf,
                     const std::optional<Tensor>& shard_sums) {
  CallScalars call;
  call.maximize = maximize;
  call.scale = scale;
  call.base_weight = base_weight;
  call.mean_norms = mean_norms;
  std::vector<TensorJob> jobs;
  const Lists lists = adamw_llaca_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                               state_steps, emas, prev_grads, alphas, alpha_fell_backs,
                                               ema_pending);
  const at::ScalarType ema_dtype = build_jobs(lists, /*adamw=*/true, amsgrad, llaca, shard_sums, jobs, call);
  check_call_scalar(lr_tensor, "lr", c10::Device(c10::DeviceType::CPU));
  if (read_amp(grad_scale, found_inf, call)) return;
  if (lr_tensor.has_value() && lr_tensor->defined()) lr = lr_tensor->item<double>();
  for (int64_t i = 0; i < static_cast<int64_t>(jobs.size()); ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    jobs[i].adamw = adamw_scalars(lr, beta1, beta2, weight_decay, eps, static_cast<double>(*step));
  }
  if (params.empty()) return;
  const at::ScalarType dtype = params[0].scalar_type();
  if (amsgrad) {
    if (llaca) dispatch_dtypes<true, true, true>(dtype, ema_dtype, jobs, call);
    else dispatch_dtypes<true, true, false>(dtype, ema_dtype, jobs, call);
  } else {
    if (llaca) dispatch_dtypes<true, false, true>(dtype, ema_dtype, jobs, call);
    else dispatch_dtypes<true, false, false>(dtype, ema_dtype, jobs, call);
  }
}

void llaca_update_cpu(TensorList params, TensorList grads, TensorList emas, TensorList prev_grads,
                      TensorList alphas, TensorList alpha_fell_backs, double scale, double base_weight,
                      bool mean_norms, const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
                      const std::optional<Tensor>& shard_sums) {
  CallScalars call;
  call.scale = scale;
  call.base_weight = base_weight;
  call.mean_norms = mean_norms;
  std::vector<TensorJob> jobs;
  const Lists lists = llaca_update_lists(params, grads, emas, prev_grads, alphas, alpha_fell_backs);
  const at::ScalarType ema_dtype =
      build_jobs(lists, /*adamw=*/false, false, /*llaca=*/true, shard_sums, jobs, call);
  if (read_amp(grad_scale, found_inf, call)) return;
  if (params.empty()) return;
  dispatch_dtypes<false, false, true>(params[0].scalar_type(), ema_dtype, jobs, call);
}

// llaca_flush_ on the CPU: the blends that deferring steps (NOTE [CPU deferred blend]) or sharded
// steps left pending. Tensors whose flag is set are blended with the alpha in their slot, block by
// block over the threads, and their flags cleared.
template <typename param_t, typename ema_t>
void run_flush(std::vector<TensorJob>& jobs) {
  static thread_local Workspace workspace;  // see run_step
  std::vector<Item>& items = workspace.items;
  std::vector<int64_t>& item_ends = workspace.item_ends;
  items.clear();
  item_ends.clear();
  int64_t elements = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
    append_blocks(j, jobs[j].numel, items, item_ends, elements);
  }
  parallel_over_items(items, item_ends, /*backwards=*/false, [&](int64_t k) {
    chunk_blend<param_t, ema_t>(jobs[items[k].job], items[k].begin, items[k].end);
  });
}

void llaca_flush_cpu(TensorList params, TensorList emas, TensorList alphas, TensorList ema_pending) {
  const Lists lists = llaca_flush_lists(params, emas, alphas, ema_pending);
  const at::ScalarType ema_dtype = check_flush_lists(lists, c10::DeviceType::CPU, "cpu");
  std::vector<TensorJob> jobs;
  std::vector<bool*> flags;
  for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
    bool* flag = ema_pending[i].data_ptr<bool>();
    if (!*flag) continue;
    TensorJob job;
    job.numel = params[i].numel();
    job.param = params[i].data_ptr();
    job.ema = emas[i].data_ptr();
    job.alpha = alphas[i].data_ptr<float>();
    jobs.push_back(job);
    flags.push_back(flag);
  }
  if (jobs.empty()) return;
  with_param_type(params[0].scalar_type(), [&](auto t) {
    using param_t = typename decltype(t)::type;
    if (ema_dtype == at::kFloat) run_flush<param_t, float>(jobs);
    else run_flush<param_t, param_t>(jobs);
  });
  for (bool* flag : flags) *flag = false;
}

}  // namespace

TORCH_LIBRARY_IMPL(llaca_optim, CPU, m) {
  m.impl("adamw_llaca_", &adamw_llaca_cpu);
  m.impl("llaca_update_", &llaca_update_cpu);
  m.impl("llaca_flush_", &llaca_flush_cpu);
}

}  // namespace cpu
}  // namespace llaca
