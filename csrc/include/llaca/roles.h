// The per-tensor roles of the ops, declared once for the C++ side: the twin of
// llaca_optim/ops/roles.py, in the same order (tests/ops/test_roles.py compares the two).
//
// A role is one per-tensor list argument of the ops. From the table below follow one tensor's
// raw pointers (Pointers, which the CUDA kernels' TensorMeta and the CPU kernels' TensorJob
// extend), which roles a call uses, the ops' argument struct and its checks (Lists in checks.h)
// and the CUDA workspace's key and image (cuda/workspace.h), all by name or by role, never by
// position. No ATen here: the CUDA kernels' device code includes it. Adding a state tensor is one line here and one row in roles.py (and,
// of course, the kernels' arithmetic that reads it).
#pragma once

#include <cstdint>

namespace llaca {

// What a role's tensors are: arrays shaped and laid out like the parameter, in its dtype
// (kParam) or in the call's one EMA dtype (kEma), or one-element slots of a fixed dtype.
enum class Kind { kParam, kEma, kFloatSlot, kBoolSlot };
// Which part of the update needs a role (roles.py's "part"), hence whether a call uses it.
enum class Part { kTensor, kAdamW, kAmsGrad, kLLaCA, kDeferral };

// X(list argument, pointer field, pointer type, kind, part)
#define LLACA_ROLES(X)                                                      \
  X(params, param, void*, Kind::kParam, Part::kTensor)                      \
  X(grads, grad, const void*, Kind::kParam, Part::kTensor)                  \
  X(exp_avgs, exp_avg, void*, Kind::kParam, Part::kAdamW)                   \
  X(exp_avg_sqs, exp_avg_sq, void*, Kind::kParam, Part::kAdamW)             \
  X(max_exp_avg_sqs, max_exp_avg_sq, void*, Kind::kParam, Part::kAmsGrad)   \
  X(state_steps, step, float*, Kind::kFloatSlot, Part::kAdamW)              \
  X(emas, ema, void*, Kind::kEma, Part::kLLaCA)                             \
  X(prev_grads, prev_grad, void*, Kind::kParam, Part::kLLaCA)               \
  X(alphas, alpha, float*, Kind::kFloatSlot, Part::kLLaCA)                  \
  X(alpha_fell_backs, alpha_fell_back, bool*, Kind::kBoolSlot, Part::kLLaCA)\
  X(ema_pending, pending, uint8_t*, Kind::kBoolSlot, Part::kDeferral)

enum Role : int {
#define LLACA_ROLE_ENUM(list, field, type, kind, part) k_##list,
  LLACA_ROLES(LLACA_ROLE_ENUM)
#undef LLACA_ROLE_ENUM
  kRoleCount
};

struct RoleInfo {
  const char* name;  // the op's argument
  Kind kind;
  Part part;
};

constexpr RoleInfo kRoleInfo[kRoleCount] = {
#define LLACA_ROLE_INFO(list, field, type, kind, part) {#list, kind, part},
    LLACA_ROLES(LLACA_ROLE_INFO)
#undef LLACA_ROLE_INFO
};

constexpr bool is_array(Kind kind) { return kind == Kind::kParam || kind == Kind::kEma; }

// Whether a call of the fused step (adamw), with amsgrad and the LLaCA update on or off, or of
// the standalone update (adamw false, llaca true), uses a part's roles. The deferral flags are
// used when given (an empty list: the call blends within itself).
constexpr bool uses(Part part, bool adamw, bool amsgrad, bool llaca) {
  return part == Part::kTensor || (part == Part::kAdamW && adamw) ||
         (part == Part::kAmsGrad && adamw && amsgrad) ||
         ((part == Part::kLLaCA || part == Part::kDeferral) && llaca);
}

// One tensor's arrays and slots as raw pointers, by role; null where the call does not use one.
struct Pointers {
#define LLACA_ROLE_POINTER(list, field, type, kind, part) type field = nullptr;
  LLACA_ROLES(LLACA_ROLE_POINTER)
#undef LLACA_ROLE_POINTER

  void set(int role, int64_t address) {
    switch (role) {
#define LLACA_ROLE_SET(list, field, type, kind, part) \
  case k_##list:                                      \
    field = reinterpret_cast<type>(address);          \
    break;
      LLACA_ROLES(LLACA_ROLE_SET)
#undef LLACA_ROLE_SET
      default: break;
    }
  }
};

}  // namespace llaca
