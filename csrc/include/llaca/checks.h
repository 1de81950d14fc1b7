// Input checks at the op boundary, shared by the CPU and CUDA kernels.
//
// The Python layer validates user input with messages that name the parameter (docs/spec.md section 6);
// these guard direct callers of the torch.library ops and keep a bad call from touching memory.
// Everything is checked before anything is written.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <optional>

#include "llaca/roles.h"

namespace llaca {

using at::Tensor;
using at::TensorList;

// The per-tensor lists of one call, one field per role; a call leaves the lists it does not take
// empty. Filled by name (designated initializers), read by name or by role (lists[k_emas]).
struct Lists {
#define LLACA_ROLE_LIST(list, field, type, kind, part) TensorList list;
  LLACA_ROLES(LLACA_ROLE_LIST)
#undef LLACA_ROLE_LIST

  TensorList operator[](int role) const {
    switch (role) {
#define LLACA_ROLE_CASE(list, field, type, kind, part) \
  case k_##list:                                       \
    return list;
      LLACA_ROLES(LLACA_ROLE_CASE)
#undef LLACA_ROLE_CASE
      default: return {};
    }
  }
};

// The Lists of each op, from its arguments (the kernels' entry points have the schemas' parameter
// names and order, tests/ops/test_roles.py checks both).
inline Lists adamw_llaca_lists(TensorList params, TensorList grads, TensorList exp_avgs,
                               TensorList exp_avg_sqs, TensorList max_exp_avg_sqs,
                               TensorList state_steps, TensorList emas, TensorList prev_grads,
                               TensorList alphas, TensorList alpha_fell_backs,
                               TensorList ema_pending) {
  return {.params = params, .grads = grads, .exp_avgs = exp_avgs, .exp_avg_sqs = exp_avg_sqs,
          .max_exp_avg_sqs = max_exp_avg_sqs, .state_steps = state_steps, .emas = emas,
          .prev_grads = prev_grads, .alphas = alphas, .alpha_fell_backs = alpha_fell_backs,
          .ema_pending = ema_pending};
}

inline Lists llaca_update_lists(TensorList params, TensorList grads, TensorList emas,
                                TensorList prev_grads, TensorList alphas,
                                TensorList alpha_fell_backs) {
  return {.params = params, .grads = grads, .emas = emas, .prev_grads = prev_grads,
          .alphas = alphas, .alpha_fell_backs = alpha_fell_backs};
}

inline Lists llaca_flush_lists(TensorList params, TensorList emas, TensorList alphas,
                               TensorList ema_pending) {
  return {.params = params, .emas = emas, .alphas = alphas, .ema_pending = ema_pending};
}

// The lists a call uses, by role, taken out of its Lists once per call (a role the call does not
// use has an empty list here); what is read per tensor.
struct RolesInUse {
  TensorList lists[kRoleCount];

  RolesInUse(const Lists& l, bool adamw, bool amsgrad, bool llaca) {
    for (int r = 0; r < kRoleCount; ++r) {
      if (uses(kRoleInfo[r].part, adamw, amsgrad, llaca)) lists[r] = l[r];
    }
  }

  // The address of tensor i of role r, or 0 where the call leaves that list empty.
  int64_t address(int r, int64_t i) const {
    return lists[r].empty() ? 0 : reinterpret_cast<int64_t>(lists[r][i].data_ptr());
  }
};

// Points `ptrs` at tensor i of every role the call uses.
inline void point_at(Pointers& ptrs, const RolesInUse& roles, int64_t i) {
  for (int r = 0; r < kRoleCount; ++r) ptrs.set(r, roles.address(r, i));
}

// Two tensors walked with one flat index must lay their elements out identically; strides of
// size-1 dimensions do not matter (same_layout in llaca_optim/ops/registry.py is the same rule).
inline bool same_layout(const Tensor& a, const Tensor& b) {
  if (a.numel() <= 1) return true;
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

inline void check_companion(const Tensor& p, const Tensor& t, const char* what, int64_t i,
                            bool same_dtype = true) {
  TORCH_CHECK(t.device() == p.device(), "llaca_optim: ", what, "[", i, "] is on ", t.device(),
              " but its parameter is on ", p.device());
  TORCH_CHECK(t.sizes() == p.sizes(), "llaca_optim: ", what, "[", i, "] has shape ", t.sizes(),
              " but its parameter has shape ", p.sizes());
  TORCH_CHECK(same_layout(p, t), "llaca_optim: ", what, "[", i, "] has strides ", t.strides(),
              " but its parameter has strides ", p.strides(),
              "; the fused kernels update memory in place and need identical layouts");
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == p.scalar_type(), "llaca_optim: ", what, "[", i, "] has dtype ",
                t.scalar_type(), " but its parameter has dtype ", p.scalar_type());
  }
}

// A one-element per-tensor slot (step count, alpha, fallback flag) on the parameter's device.
inline void check_scalar_slot(const Tensor& t, at::ScalarType dtype, const char* what, int64_t i,
                              const c10::Device& device) {
  TORCH_CHECK(t.device() == device && t.numel() == 1 && t.scalar_type() == dtype, "llaca_optim: ",
              what, "[", i, "] must be a one-element tensor of dtype ", dtype, " on ", device,
              ", got ", t.scalar_type(), " with ", t.numel(), " elements on ", t.device());
}

// An optional one-element call-wide tensor (lr, grad_scale, found_inf) on `device`: float32, or
// float64 too where `allow_double`.
inline void check_call_scalar(const std::optional<Tensor>& t, const char* what,
                              const c10::Device& device, bool allow_double = true) {
  if (!t.has_value() || !t->defined()) return;
  TORCH_CHECK(t->device() == device && t->numel() == 1 &&
                  (t->scalar_type() == at::kFloat ||
                   (allow_double && t->scalar_type() == at::kDouble)),
              "llaca_optim: ", what, " must be a one-element ",
              allow_double ? "float32 or float64" : "float32", " tensor on ", device,
              " (the parameters' device), got ", t->scalar_type(), " with ", t->numel(),
              " elements on ", t->device());
}

// The parameter dtypes every fused kernel takes (check_lists admits exactly these): calls
// fn(Type<param_t>{}) for the runtime dtype, the one switch from dtype to kernel template.
template <typename T>
struct Type {
  using type = T;
};

template <typename Fn>
decltype(auto) with_param_type(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(Type<float>{});
    case at::kBFloat16: return fn(Type<c10::BFloat16>{});
    case at::kHalf: return fn(Type<c10::Half>{});
    default: TORCH_CHECK(false, "llaca_optim: no fused kernels for dtype ", dtype);
  }
}

// params[i] of a call: on the kernels' device (params[0]'s), dense, of a fused dtype, params[0]'s.
inline void check_param(TensorList params, int64_t i, c10::DeviceType device_type,
                        const char* kernels) {
  const Tensor& p = params[i];
  TORCH_CHECK(p.device().type() == device_type && p.device() == params[0].device(),
              "llaca_optim: params[", i, "] is on ", p.device(), "; the ", kernels,
              " kernels take ", c10::DeviceTypeName(device_type, /*lower_case=*/true),
              " tensors, all on one device (params[0] is on ", params[0].device(), ")");
  TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(),
              "llaca_optim: params[", i,
              "] is not dense (a view with gaps or overlaps); the fused kernels update memory "
              "in place: use the reference backend for such tensors");
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kBFloat16 ||
                  p.scalar_type() == at::kHalf,
              "llaca_optim: params[", i, "] has dtype ", p.scalar_type(), "; the ", kernels,
              " kernels take float32, bfloat16 and float16 (float64 goes to the reference "
              "backend)");
  TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), "llaca_optim: params[", i,
              "] has dtype ", p.scalar_type(), " but params[0] has ", params[0].scalar_type(),
              "; one call takes one dtype");
}

// Tensor i of role r (not params): an array shaped and laid out as its parameter, in the
// parameter's dtype or (EMAs) in the call's one EMA dtype, float32 or the parameters'; or a
// one-element slot of its dtype on the parameter's device.
inline void check_role(const Lists& l, int r, int64_t i, at::ScalarType ema_dtype) {
  const Tensor& p = l.params[i];
  const Tensor& t = l[r][i];
  const char* what = kRoleInfo[r].name;
  switch (kRoleInfo[r].kind) {
    case Kind::kParam: check_companion(p, t, what, i); break;
    case Kind::kEma:
      check_companion(p, t, what, i, /*same_dtype=*/false);
      TORCH_CHECK(t.scalar_type() == ema_dtype &&
                      (ema_dtype == at::kFloat || ema_dtype == p.scalar_type()),
                  "llaca_optim: ", what, "[", i, "] has dtype ", t.scalar_type(),
                  "; EMAs must all be float32 or all in the parameters' dtype");
      break;
    case Kind::kFloatSlot: check_scalar_slot(t, at::kFloat, what, i, p.device()); break;
    case Kind::kBoolSlot: check_scalar_slot(t, at::kBool, what, i, p.device()); break;
  }
}

// Checks every list a call uses against params (`used(role)` says which it uses; a role whose
// list may be left empty, the deferral flags, is checked when given); returns the EMAs' dtype
// (float32 when there are none). `device_type` is the kernels' device type; all tensors must be
// on params[0]'s device.
template <typename Used>
inline at::ScalarType check_roles(const Lists& l, Used&& used, c10::DeviceType device_type,
                                  const char* kernels) {
  const int64_t n = static_cast<int64_t>(l.params.size());
  int checked[kRoleCount];
  int n_checked = 0;
  for (int r = 1; r < kRoleCount; ++r) {
    const RoleInfo& role = kRoleInfo[r];
    if (!used(r) || (role.part == Part::kDeferral && l[r].empty())) continue;
    TORCH_CHECK(static_cast<int64_t>(l[r].size()) == n, "llaca_optim: ", role.name, " has ",
                l[r].size(), " tensors but params has ", n);
    checked[n_checked++] = r;
  }
  const bool with_emas = std::find(checked, checked + n_checked, int(k_emas)) != checked + n_checked;
  const at::ScalarType ema_dtype = n > 0 && with_emas ? l.emas[0].scalar_type() : at::kFloat;
  for (int64_t i = 0; i < n; ++i) {
    check_param(l.params, i, device_type, kernels);
    for (int k = 0; k < n_checked; ++k) check_role(l, checked[k], i, ema_dtype);
  }
  return ema_dtype;
}

// The lists of adamw_llaca_ (adamw) or llaca_update_.
inline at::ScalarType check_lists(const Lists& l, bool adamw, bool amsgrad, bool llaca,
                                  c10::DeviceType device_type, const char* kernels) {
  TORCH_CHECK(llaca || l.ema_pending.empty(), "llaca_optim: ema_pending has ",
              l.ema_pending.size(), " tensors in a call with llaca=False; pass an empty list");
  return check_roles(
      l, [&](int r) { return uses(kRoleInfo[r].part, adamw, amsgrad, llaca); }, device_type,
      kernels);
}

// The sharded-training mode's output (llaca_optim/ops/library.py, `shard_sums`): a contiguous float64
// [n, 3] tensor on the parameters' device that receives each tensor's local sums a, b, c. Returns
// its rows, or null when the call computes alphas itself.
inline double* shard_sum_rows(const std::optional<Tensor>& sums, const Lists& l, bool llaca) {
  if (!sums.has_value() || !sums->defined()) return nullptr;
  const int64_t n = static_cast<int64_t>(l.params.size());
  TORCH_CHECK(llaca, "llaca_optim: shard_sums was given to a call with llaca=False, which has no "
              "sums to write; pass shard_sums=None");
  TORCH_CHECK(sums->scalar_type() == at::kDouble && sums->dim() == 2 && sums->size(0) == n &&
                  sums->size(1) == 3 && sums->is_contiguous(),
              "llaca_optim: shard_sums must be a contiguous float64 tensor of shape [", n,
              ", 3] (one row per parameter), got ", sums->scalar_type(), " of shape ",
              sums->sizes());
  TORCH_CHECK(n == 0 || sums->device() == l.params[0].device(), "llaca_optim: shard_sums is on ",
              sums->device(), " but the parameters are on ", l.params[0].device());
  return sums->data_ptr<double>();
}

// The lists of llaca_flush_ (params, emas, alphas, ema_pending; the others empty); returns the
// EMAs' dtype.
inline at::ScalarType check_flush_lists(const Lists& l, c10::DeviceType device_type,
                                        const char* kernels) {
  const size_t n = l.params.size();
  TORCH_CHECK(l.emas.size() == n && l.alphas.size() == n && l.ema_pending.size() == n,
              "llaca_optim: llaca_flush_ takes one EMA, alpha and flag per parameter; got ", n,
              " params, ", l.emas.size(), " emas, ", l.alphas.size(), " alphas and ",
              l.ema_pending.size(), " flags");
  return check_roles(
      l, [](int r) { return r == k_emas || r == k_alphas || r == k_ema_pending; }, device_type,
      kernels);
}

}  // namespace llaca
