// The two ops on a GPU-like runtime: checks, the workspace of the call, the scalars, the launch.
//
// Written once over a Runtime (ops_cuda.cpp: the GPU; tests/cuda_sim/: the CPU emulation the
// tests run these very kernels and this very host code through). A Runtime provides, besides
// what WorkspaceCache needs (workspace.h):
//   static constexpr c10::DeviceType kDeviceType; static constexpr const char* kName;
//   struct Guard { explicit Guard(const c10::Device&); };
//   static Stream current_stream(const c10::Device&); static bool capturing(Stream);
//   static void launch(at::ScalarType param_dtype, const CallShape&, const StepArgs&, Stream);
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <mutex>
#include <optional>

#include "kernel_args.h"
#include "llaca/checks.h"
#include "workspace.h"

namespace llaca {
namespace cuda {

inline int64_t chunk_elems(at::ScalarType dtype) {
  return with_param_type(dtype, [](auto t) { return kChunk<typename decltype(t)::type>; });
}

// An AMP tensor (GradScaler's scale or found-inf flag), read by the kernels: float32 only.
inline const float* amp_pointer(const std::optional<Tensor>& t, const char* what,
                                const c10::Device& device) {
  check_call_scalar(t, what, device, /*allow_double=*/false);
  return t.has_value() && t->defined() ? t->data_ptr<float>() : nullptr;
}

template <typename Runtime>
class Ops {
 public:
  static void adamw_llaca(TensorList params, TensorList grads, TensorList exp_avgs,
                          TensorList exp_avg_sqs, TensorList max_exp_avg_sqs,
                          TensorList state_steps, TensorList emas, TensorList prev_grads,
                          TensorList alphas, TensorList alpha_fell_backs, TensorList ema_pending,
                          double lr, double beta1,
                          double beta2, double weight_decay, double eps, bool amsgrad,
                          bool maximize, bool llaca, double scale, double base_weight,
                          bool mean_norms, const std::optional<Tensor>& lr_tensor,
                          const std::optional<Tensor>& grad_scale,
                          const std::optional<Tensor>& found_inf,
                          const std::optional<Tensor>& shard_sums) {
    const Lists lists = adamw_llaca_lists(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                                 state_steps, emas, prev_grads, alphas, alpha_fell_backs,
                                                 ema_pending);
    const at::ScalarType ema_dtype =
        check_lists(lists, /*adamw=*/true, amsgrad, llaca, Runtime::kDeviceType, Runtime::kName);
    double* sum_rows = shard_sum_rows(shard_sums, lists, llaca);
    if (params.empty()) return;
    const c10::Device device = params[0].device();
    StepArgs hyper = llaca_scalars(device, scale, base_weight, mean_norms, grad_scale, found_inf);
    hyper.lr = lr;
    if (lr_tensor.has_value() && lr_tensor->defined()) {
      if (lr_tensor->device().is_cpu()) {
        // A CPU learning-rate tensor is read here: no device synchronisation involved.
        check_call_scalar(lr_tensor, "lr", lr_tensor->device());
        hyper.lr = lr_tensor->item<double>();
      } else {
        check_call_scalar(lr_tensor, "lr", device);
        hyper.lr_ptr = lr_tensor->data_ptr();
        hyper.lr_is_double = lr_tensor->scalar_type() == at::kDouble;
      }
    }
    hyper.maximize = maximize;
    hyper.beta1 = beta1;
    hyper.beta2 = beta2;
    hyper.weight_decay = weight_decay;
    hyper.eps = eps;
    hyper.shard_sums = sum_rows;
    CallShape flags;
    flags.adamw = true;
    flags.amsgrad = amsgrad;
    flags.llaca = llaca;
    flags.defer = llaca && !ema_pending.empty();
    run(lists, flags, ema_dtype, hyper);
  }

  static void llaca_update(TensorList params, TensorList grads, TensorList emas,
                           TensorList prev_grads, TensorList alphas, TensorList alpha_fell_backs,
                           double scale, double base_weight, bool mean_norms,
                           const std::optional<Tensor>& grad_scale,
                           const std::optional<Tensor>& found_inf,
                           const std::optional<Tensor>& shard_sums) {
    const Lists lists = llaca_update_lists(params, grads, emas, prev_grads, alphas, alpha_fell_backs);
    const at::ScalarType ema_dtype = check_lists(lists, /*adamw=*/false, false, /*llaca=*/true,
                                                 Runtime::kDeviceType, Runtime::kName);
    double* sum_rows = shard_sum_rows(shard_sums, lists, /*llaca=*/true);
    if (params.empty()) return;
    StepArgs hyper =
        llaca_scalars(params[0].device(), scale, base_weight, mean_norms, grad_scale, found_inf);
    hyper.shard_sums = sum_rows;
    CallShape flags;
    flags.llaca = true;
    run(lists, flags, ema_dtype, hyper);
  }

  // Applies and clears the pending blends of the fused step's deferral (NOTE [CUDA deferred
  // blend] in kernel_args.h): ema <- ema + alpha (p - ema) where ema_pending is set.
  static void llaca_flush(TensorList params, TensorList emas, TensorList alphas,
                          TensorList ema_pending) {
    const Lists lists = llaca_flush_lists(params, emas, alphas, ema_pending);
    const at::ScalarType ema_dtype =
        check_flush_lists(lists, Runtime::kDeviceType, Runtime::kName);
    if (params.empty()) return;
    CallShape flags;
    flags.llaca = true;
    flags.flush = true;
    run(lists, flags, ema_dtype, StepArgs{});
  }

 private:
  // The LLaCA scalars of a call, and its AMP tensors as device pointers.
  static StepArgs llaca_scalars(const c10::Device& device, double scale, double base_weight,
                                bool mean_norms, const std::optional<Tensor>& grad_scale,
                                const std::optional<Tensor>& found_inf) {
    StepArgs hyper{};
    hyper.scale = scale;
    hyper.base_weight = base_weight;
    hyper.mean_norms = mean_norms;
    hyper.grad_scale = amp_pointer(grad_scale, "grad_scale", device);
    hyper.found_inf = amp_pointer(found_inf, "found_inf", device);
    return hyper;
  }

  static void run(const Lists& lists, CallShape flags, at::ScalarType ema_dtype,
                  const StepArgs& hyper) {
    const c10::Device device = lists.params[0].device();
    const at::ScalarType dtype = lists.params[0].scalar_type();
    typename Runtime::Guard guard(device);
    const auto stream = Runtime::current_stream(device);
    // One cache per process, shared by every optimizer and device (the key holds the device).
    static std::mutex mutex;
    static WorkspaceCache<Runtime> cache(/*capacity=*/16);
    static std::vector<int64_t> key;  // reused: guarded by the mutex
    std::lock_guard<std::mutex> lock(mutex);
    workspace_key(lists, flags.adamw, flags.amsgrad, flags.llaca, key);
    auto& entry = cache.get(key, chunk_elems(dtype),
                            device, stream, Runtime::capturing(stream));
    StepArgs args = hyper;
    point_at_workspace(args, static_cast<uint8_t*>(entry.device.data_ptr()), entry.layout);
    CallShape shape = flags;
    shape.chunks = entry.shape.chunks;
    shape.split_chunks = entry.shape.split_chunks;
    shape.ema_fp32 = ema_dtype == at::kFloat;
    shape.sharded = args.shard_sums != nullptr;
    Runtime::launch(dtype, shape, args, stream);
  }
};

}  // namespace cuda
}  // namespace llaca
