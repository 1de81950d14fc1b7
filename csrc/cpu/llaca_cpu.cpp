// CPU kernels of the llaca_optim ops: the fused AdamW + LLaCA step and the standalone LLaCA update,
// over lists of tensors, registered for the CPU dispatch key under the schemas declared in
// llaca_optim/_ops.py.
//
// NOTE [CPU work decomposition]
// Every tensor is cut into fixed-size chunks of kChunk elements ("items"); all items of all tensors
// of one call are spread over the intra-op threads by element count. The chunk boundaries do not
// depend on the thread count, and each chunk's three partial sums are stored in its own slot and
// added up per tensor in chunk order, so the reductions give the same bits run after run and for
// any number of threads (no atomics).
//   pass 1 (parallel over items): AdamW on the chunk, then the LLaCA partial sums
//           a = sum|p - ema|, b = sum|g|, c = sum|g - g_prev| and the g_prev <- g copy.
//           A tensor that fits in one chunk finishes right here: its alpha is known at the end of
//           the chunk and the EMA blend re-reads p and ema while they are still in L1/L2.
//   pass 2 (serial over the multi-chunk tensors): add the chunk sums, compute alpha.
//   pass 3 (parallel over the items of multi-chunk tensors): ema <- ema + alpha (p - ema).
// The only scratch memory is one thread-local vector of partial sums, grown once and reused.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "llaca/math.h"

namespace llaca {
namespace cpu {
namespace {

constexpr int64_t kChunk = int64_t(1) << 15;

using at::Tensor;
using at::TensorList;

// Everything one tensor contributes to a call, resolved to raw pointers once per step.
struct TensorJob {
  int64_t numel = 0;
  void* param = nullptr;
  const void* grad = nullptr;
  void* exp_avg = nullptr;
  void* exp_avg_sq = nullptr;
  void* max_exp_avg_sq = nullptr;
  void* ema = nullptr;
  void* prev_grad = nullptr;
  float* alpha = nullptr;
  bool* fell_back = nullptr;
  bool fresh = false;
  AdamWScalars adamw{};
  int64_t first_item = 0;
  int64_t num_items = 0;
};

struct Item {
  int64_t job;
  int64_t begin;
  int64_t end;
};

struct CallScalars {
  bool maximize = false;
  bool has_grad_scale = false;
  float grad_scale = 1.0f;
  double scale = 0.0;
  double base_weight = 0.0;
};

template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}

// Phase 1 on the elements [begin, end) of one tensor. Returns the three partial L1 sums.
// FRESH (the tensor's first LLaCA step) is a template parameter, not a branch in the loop: a
// conditional store inside the loop keeps GCC from vectorising it.
template <typename param_t, typename ema_t, bool ADAMW, bool AMSGRAD, bool LLACA, bool FRESH>
void chunk_step(const TensorJob& job, int64_t begin, int64_t end, const CallScalars& call,
                float* partial) {
  param_t* __restrict__ p = static_cast<param_t*>(job.param);
  const param_t* __restrict__ g = static_cast<const param_t*>(job.grad);
  param_t* __restrict__ m = static_cast<param_t*>(job.exp_avg);
  param_t* __restrict__ v = static_cast<param_t*>(job.exp_avg_sq);
  param_t* __restrict__ vmax = static_cast<param_t*>(job.max_exp_avg_sq);
  ema_t* __restrict__ ema = static_cast<ema_t*>(job.ema);
  param_t* __restrict__ gprev = static_cast<param_t*>(job.prev_grad);
  const AdamWScalars s = job.adamw;
  const float sign = call.maximize ? -1.0f : 1.0f;
  const bool unscale = call.has_grad_scale;
  const float grad_scale = call.grad_scale;

  float sum_a = 0.0f, sum_b = 0.0f, sum_c = 0.0f;
#pragma omp simd reduction(+ : sum_a, sum_b, sum_c)
  for (int64_t i = begin; i < end; ++i) {
    float gf = to_float(g[i]);
    if (unscale) gf = gf / grad_scale;
    float pf = to_float(p[i]);
    if (ADAMW) {
      float mf = to_float(m[i]);
      float vf = to_float(v[i]);
      float vmaxf = AMSGRAD ? to_float(vmax[i]) : 0.0f;
      adamw_element<AMSGRAD>(pf, sign * gf, mf, vf, vmaxf, s);
      const param_t stored = static_cast<param_t>(pf);
      p[i] = stored;
      pf = to_float(stored);  // LLaCA sees the parameter as stored, rounding included
      m[i] = static_cast<param_t>(mf);
      v[i] = static_cast<param_t>(vf);
      if (AMSGRAD) vmax[i] = static_cast<param_t>(vmaxf);
    }
    if (LLACA) {
      const param_t g_stored = unscale ? static_cast<param_t>(gf) : g[i];
      if (FRESH) {
        ema[i] = static_cast<ema_t>(pf);
      } else {
        const float e = to_float(ema[i]);
        sum_a += std::fabs(pf - e);
        sum_b += std::fabs(gf);
        sum_c += std::fabs(gf - to_float(gprev[i]));
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
  const param_t* __restrict__ p = static_cast<const param_t*>(job.param);
  ema_t* __restrict__ ema = static_cast<ema_t*>(job.ema);
  const float alpha = *job.alpha;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float e = to_float(ema[i]);
    ema[i] = static_cast<ema_t>(e + alpha * (to_float(p[i]) - e));
  }
}

// Sums the partials of one tensor in chunk order and writes its alpha and fallback flag.
void finish_alpha(const TensorJob& job, const float* partials, const CallScalars& call) {
  if (job.fresh) {  // no previous gradient yet: SPEC's `else` branch
    *job.alpha = static_cast<float>(call.base_weight);
    *job.fell_back = true;
    return;
  }
  double a = 0.0, b = 0.0, c = 0.0;
  for (int64_t k = 0; k < job.num_items; ++k) {
    a += partials[3 * (job.first_item + k) + 0];
    b += partials[3 * (job.first_item + k) + 1];
    c += partials[3 * (job.first_item + k) + 2];
  }
  double alpha = 0.0;
  *job.fell_back = balance_weight<double>(a, b, c, call.scale, call.base_weight, alpha);
  *job.alpha = static_cast<float>(alpha);
}

// Splits the items over the threads by element count, so one large tensor next to many small
// ones does not leave a thread idle. Any split gives the same result (NOTE [CPU work decomposition]).
template <typename Fn>
void parallel_over_items(const std::vector<Item>& items, const std::vector<int64_t>& item_ends,
                         Fn&& fn) {
  const int64_t n = static_cast<int64_t>(items.size());
  if (n == 0) return;
  const int64_t total = item_ends.back();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  if (threads == 1 || total < 2 * kChunk) {
    for (int64_t k = 0; k < n; ++k) fn(k);
    return;
  }
  at::parallel_for(0, threads, 1, [&](int64_t t_begin, int64_t t_end) {
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t lo_elem = total * t / threads;
      const int64_t hi_elem = total * (t + 1) / threads;
      // items whose end lies in (lo_elem, hi_elem] belong to thread t
      auto first = std::upper_bound(item_ends.begin(), item_ends.end(), lo_elem) - item_ends.begin();
      auto last = std::upper_bound(item_ends.begin(), item_ends.end(), hi_elem) - item_ends.begin();
      if (t == threads - 1) last = n;
      for (int64_t k = first; k < last; ++k) fn(k);
    }
  });
}

template <typename param_t, typename ema_t, bool ADAMW, bool AMSGRAD, bool LLACA>
void run_step(std::vector<TensorJob>& jobs, const CallScalars& call) {
  std::vector<Item> items;
  std::vector<int64_t> item_ends;
  int64_t elements = 0;
  for (int64_t j = 0; j < static_cast<int64_t>(jobs.size()); ++j) {
    TensorJob& job = jobs[j];
    job.first_item = static_cast<int64_t>(items.size());
    for (int64_t begin = 0; begin < job.numel; begin += kChunk) {
      const int64_t end = std::min(job.numel, begin + kChunk);
      items.push_back({j, begin, end});
      elements += end - begin;
      item_ends.push_back(elements);
    }
    job.num_items = static_cast<int64_t>(items.size()) - job.first_item;
  }
  // Scratch for the chunk partial sums: reused from call to call (grows, never shrinks).
  static thread_local std::vector<float> partials;
  if (partials.size() < 3 * items.size()) partials.resize(3 * items.size());
  float* partial_data = partials.data();

  parallel_over_items(items, item_ends, [&](int64_t k) {
    const Item& item = items[k];
    const TensorJob& job = jobs[item.job];
    float* partial = partial_data + 3 * k;
    if (LLACA && job.fresh) {
      chunk_step<param_t, ema_t, ADAMW, AMSGRAD, LLACA, true>(job, item.begin, item.end, call, partial);
    } else {
      chunk_step<param_t, ema_t, ADAMW, AMSGRAD, LLACA, false>(job, item.begin, item.end, call, partial);
    }
    if (LLACA && job.num_items == 1) {  // the whole tensor is this chunk: finish while it is hot
      finish_alpha(job, partial_data, call);
      if (!job.fresh) chunk_blend<param_t, ema_t>(job, item.begin, item.end);
    }
  });
  if (!LLACA) return;

  bool any_multi_chunk = false;
  for (const TensorJob& job : jobs) {
    if (job.num_items != 1) {  // empty tensors (no item) and multi-chunk ones
      finish_alpha(job, partial_data, call);
      any_multi_chunk = any_multi_chunk || job.num_items > 1;
    }
  }
  if (!any_multi_chunk) return;
  parallel_over_items(items, item_ends, [&](int64_t k) {
    const Item& item = items[k];
    const TensorJob& job = jobs[item.job];
    if (job.num_items > 1 && !job.fresh) chunk_blend<param_t, ema_t>(job, item.begin, item.end);
  });
}

// ----------------------------------------------------------------------------------------------
// Input checks. The Python layer validates user input with messages that name the parameter;
// these guard the op boundary for direct callers and keep a bad call from touching memory.

// Two tensors that are walked with one flat index must lay their elements out identically; strides
// of size-1 dimensions do not matter (llaca_optim/backends/_layout.py applies the same rule).
bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.numel() <= 1) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

void check_companion(const Tensor& p, const Tensor& t, const char* what, int64_t i,
                     bool same_dtype = true) {
  TORCH_CHECK(t.device() == p.device(), "llaca_optim: ", what, "[", i, "] is on ", t.device(),
              " but its parameter is on ", p.device());
  TORCH_CHECK(t.sizes() == p.sizes(), "llaca_optim: ", what, "[", i, "] has shape ", t.sizes(),
              " but its parameter has shape ", p.sizes());
  TORCH_CHECK(same_layout(p, t), "llaca_optim: ", what, "[", i,
              "] has strides ", t.strides(), " but its parameter has strides ", p.strides(),
              "; the CPU kernel updates memory in place and needs identical layouts");
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == p.scalar_type(), "llaca_optim: ", what, "[", i, "] has dtype ",
                t.scalar_type(), " but its parameter has dtype ", p.scalar_type());
  }
}

void check_scalar_slot(const Tensor& t, at::ScalarType dtype, const char* what, int64_t i) {
  TORCH_CHECK(t.device().is_cpu() && t.numel() == 1 && t.scalar_type() == dtype, "llaca_optim: ",
              what, "[", i, "] must be a one-element CPU tensor of dtype ", dtype, ", got ",
              t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
}

struct Lists {
  TensorList params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, emas, prev_grads,
      alphas, fell_back;
};

// Fills the jobs from the lists; returns the EMA dtype.
at::ScalarType build_jobs(const Lists& l, bool adamw, bool amsgrad, bool llaca,
                          std::vector<TensorJob>& jobs) {
  const int64_t n = static_cast<int64_t>(l.params.size());
  auto same_length = [&](TensorList list, const char* what) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == n, "llaca_optim: ", what, " has ",
                list.size(), " tensors but params has ", n);
  };
  same_length(l.grads, "grads");
  if (adamw) {
    same_length(l.exp_avgs, "exp_avgs");
    same_length(l.exp_avg_sqs, "exp_avg_sqs");
    same_length(l.state_steps, "state_steps");
    if (amsgrad) same_length(l.max_exp_avg_sqs, "max_exp_avg_sqs");
  }
  if (llaca) {
    same_length(l.emas, "emas");
    same_length(l.prev_grads, "prev_grads");
    same_length(l.alphas, "alphas");
    same_length(l.fell_back, "fell_back");
  }
  at::ScalarType ema_dtype = n > 0 && llaca ? l.emas[0].scalar_type() : at::kFloat;
  jobs.resize(n);
  for (int64_t i = 0; i < n; ++i) {
    const Tensor& p = l.params[i];
    TORCH_CHECK(p.device().is_cpu(), "llaca_optim: params[", i, "] is on ", p.device(),
                "; the cpu kernels take CPU tensors");
    TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(),
                "llaca_optim: params[", i,
                "] is not dense (a view with gaps or overlaps); the fused kernels update memory "
                "in place: use the reference backend for such tensors");
    TORCH_CHECK(p.scalar_type() == l.params[0].scalar_type(), "llaca_optim: params[", i,
                "] has dtype ", p.scalar_type(), " but params[0] has ", l.params[0].scalar_type(),
                "; one call takes one dtype");
    check_companion(p, l.grads[i], "grads", i);
    TensorJob& job = jobs[i];
    job.numel = p.numel();
    job.param = p.data_ptr();
    job.grad = l.grads[i].data_ptr();
    if (adamw) {
      check_companion(p, l.exp_avgs[i], "exp_avgs", i);
      check_companion(p, l.exp_avg_sqs[i], "exp_avg_sqs", i);
      check_scalar_slot(l.state_steps[i], at::kFloat, "state_steps", i);
      job.exp_avg = l.exp_avgs[i].data_ptr();
      job.exp_avg_sq = l.exp_avg_sqs[i].data_ptr();
      if (amsgrad) {
        check_companion(p, l.max_exp_avg_sqs[i], "max_exp_avg_sqs", i);
        job.max_exp_avg_sq = l.max_exp_avg_sqs[i].data_ptr();
      }
    }
    if (llaca) {
      check_companion(p, l.emas[i], "emas", i, /*same_dtype=*/false);
      TORCH_CHECK(l.emas[i].scalar_type() == ema_dtype &&
                      (ema_dtype == at::kFloat || ema_dtype == p.scalar_type()),
                  "llaca_optim: emas[", i, "] has dtype ", l.emas[i].scalar_type(),
                  "; EMAs must all be float32 or all in the parameters' dtype");
      check_companion(p, l.prev_grads[i], "prev_grads", i);
      check_scalar_slot(l.alphas[i], at::kFloat, "alphas", i);
      check_scalar_slot(l.fell_back[i], at::kBool, "fell_back", i);
      job.ema = l.emas[i].data_ptr();
      job.prev_grad = l.prev_grads[i].data_ptr();
      job.alpha = l.alphas[i].data_ptr<float>();
      job.fell_back = l.fell_back[i].data_ptr<bool>();
      // A negative alpha slot marks a tensor with no EMA step yet (see llaca_optim/_ops.py).
      job.fresh = *job.alpha < 0.0f;
    }
  }
  return ema_dtype;
}

template <bool ADAMW, bool AMSGRAD, bool LLACA>
void dispatch_dtypes(at::ScalarType param_dtype, at::ScalarType ema_dtype,
                     std::vector<TensorJob>& jobs, const CallScalars& call) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, param_dtype, "llaca_cpu_step", [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      TORCH_CHECK(false, "llaca_optim: the cpu kernels take float32, bfloat16 and float16 "
                         "parameters; float64 goes to the reference backend");
    } else if (!LLACA || ema_dtype == at::kFloat) {
      run_step<scalar_t, float, ADAMW, AMSGRAD, LLACA>(jobs, call);
    } else {
      run_step<scalar_t, scalar_t, ADAMW, AMSGRAD, LLACA>(jobs, call);
    }
  });
}

// Reads the AMP tensors: true when this step must change nothing.
bool read_amp(const std::optional<Tensor>& grad_scale, const std::optional<Tensor>& found_inf,
              CallScalars& call) {
  if (found_inf.has_value() && found_inf->defined()) {
    TORCH_CHECK(found_inf->device().is_cpu() && found_inf->numel() == 1,
                "llaca_optim: found_inf must be a one-element CPU tensor");
    if (found_inf->item<double>() != 0.0) return true;
  }
  if (grad_scale.has_value() && grad_scale->defined()) {
    TORCH_CHECK(grad_scale->device().is_cpu() && grad_scale->numel() == 1,
                "llaca_optim: grad_scale must be a one-element CPU tensor");
    call.has_grad_scale = true;
    call.grad_scale = grad_scale->item<float>();
  }
  return false;
}

void adamw_llaca_cpu(TensorList params, TensorList grads, TensorList exp_avgs,
                     TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList state_steps,
                     TensorList emas, TensorList prev_grads, TensorList alphas,
                     TensorList fell_back, double lr, double beta1,
                     double beta2, double weight_decay, double eps, bool amsgrad, bool maximize,
                     bool llaca, double scale, double base_weight,
                     const std::optional<Tensor>& lr_tensor, const std::optional<Tensor>& grad_scale,
                     const std::optional<Tensor>& found_inf) {
  CallScalars call;
  call.maximize = maximize;
  call.scale = scale;
  call.base_weight = base_weight;
  std::vector<TensorJob> jobs;
  Lists lists{params, grads,  exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
              emas,   prev_grads, alphas,   fell_back};
  const at::ScalarType ema_dtype = build_jobs(lists, /*adamw=*/true, amsgrad, llaca, jobs);
  if (read_amp(grad_scale, found_inf, call)) return;
  if (lr_tensor.has_value() && lr_tensor->defined()) {
    TORCH_CHECK(lr_tensor->device().is_cpu() && lr_tensor->numel() == 1,
                "llaca_optim: lr must be a float or a one-element CPU tensor for CPU parameters");
    lr = lr_tensor->item<double>();
  }
  for (int64_t i = 0; i < static_cast<int64_t>(jobs.size()); ++i) {
    float* step = state_steps[i].data_ptr<float>();
    *step += 1.0f;
    const double t = static_cast<double>(*step);
    AdamWScalars& s = jobs[i].adamw;
    s.decay = static_cast<float>(1.0 - lr * weight_decay);
    s.beta1 = static_cast<float>(beta1);
    s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    s.beta2 = static_cast<float>(beta2);
    s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    s.eps = static_cast<float>(eps);
    s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
    s.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
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
                      TensorList alphas, TensorList fell_back, double scale, double base_weight, const std::optional<Tensor>& grad_scale,
                      const std::optional<Tensor>& found_inf) {
  CallScalars call;
  call.scale = scale;
  call.base_weight = base_weight;
  std::vector<TensorJob> jobs;
  Lists lists{params, grads, {}, {}, {}, {}, emas, prev_grads, alphas, fell_back};
  const at::ScalarType ema_dtype = build_jobs(lists, /*adamw=*/false, false, /*llaca=*/true, jobs);
  if (read_amp(grad_scale, found_inf, call)) return;
  if (params.empty()) return;
  dispatch_dtypes<false, false, true>(params[0].scalar_type(), ema_dtype, jobs, call);
}

}  // namespace

TORCH_LIBRARY_IMPL(llaca_optim, CPU, m) {
  m.impl("adamw_llaca_", &adamw_llaca_cpu);
  m.impl("llaca_update_", &llaca_update_cpu);
}

}  // namespace cpu
}  // namespace llaca
