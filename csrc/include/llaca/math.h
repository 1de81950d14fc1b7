// The per-element and per-tensor mathematics of AdamW + LLaCA, shared by every native backend.
//
// Everything here is plain arithmetic on fp32 (the "opmath" type) so that the CPU kernels and the
// CUDA kernels compile the very same formulas; storage types are converted at the edges by the
// kernels. The formulas are the update of the project's contract, written out in
// llaca_optim/reference.py, which every backend is tested against.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LLACA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LLACA_HOST_DEVICE inline
#endif

namespace llaca {

// Per-tensor scalars of the AdamW step that depend on the step count; computed once per tensor per
// step (in double on the host side of the CPU kernel), not per element.
// The (1 - x) terms are formed in double before rounding to fp32: 1.0f - 0.999f is off by 1e-5
// relative, which torch's AdamW (Python floats) does not do.
struct AdamWScalars {
  float decay;            // 1 - lr * weight_decay
  float beta1;
  float one_minus_beta1;
  float beta2;
  float one_minus_beta2;
  float eps;
  float step_size;             // lr / (1 - beta1^t)
  float bias_correction2_sqrt; // sqrt(1 - beta2^t)
};

// One element of torch.optim.AdamW (decoupled weight decay), in the order torch applies it:
//   p <- p * (1 - lr * wd);  m <- m + (1-b1) (g - m), one rounding (torch's lerp_, a fused
//   multiply-add);  v <- fma((1-b2) g, g, b2 v);  [vmax <- max(vmax, v)]
//   p <- p - step_size * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)
// `g` already carries the maximize sign and the gradient unscaling. NOTE [torch's AdamW bits]:
// these are the roundings of torch's fused CPU AdamW in its vector loop, where its build contracts
// `b2 v + ((1-b2) g) g` into that FMA (measured with torch 2.13 on x86-64), so the CPU kernels give
// its bits (tests/optim/test_adamw_compat.py). torch steps the last numel % (vector width)
// elements of a tensor in a scalar loop, contracted as fma(v, b2, ((1-b2) g) g) instead; there
// the two can part by a rounding. Following that too would make an element's bits depend on where
// the tensor ends, so a sharded tensor (FSDP2, ZeRO) would no longer step as the whole tensor
// does, which every sharded path here keeps bit for bit. The FMAs are written out (fmaf): the
// build forbids the compiler to contract a*b+c on its own.
template <bool AMSGRAD>
LLACA_HOST_DEVICE void adamw_element(float& p, float g, float& m, float& v, float& vmax,
                                     const AdamWScalars& s) {
  p = p * s.decay;
#if defined(__CUDA_ARCH__)
  // On the GPU torch's AdamW has roundings of its own, so there is nothing to match, and the
  // FMA forms cost the fp16 amsgrad kernel a register it does not have at two blocks per SM
  // (tests/toolchain/test_cuda_compile.py counts spills).
  m = s.beta1 * m + s.one_minus_beta1 * g;
  v = s.beta2 * v + s.one_minus_beta2 * g * g;
#else
  m = fmaf(s.one_minus_beta1, g - m, m);
  v = fmaf(s.one_minus_beta2 * g, g, s.beta2 * v);
#endif
  float second = v;
  if (AMSGRAD) {
    vmax = vmax > v ? vmax : v;
    second = vmax;
  }
  const float denom = std::sqrt(second) / s.bias_correction2_sqrt + s.eps;
  p = p - s.step_size * m / denom;
}

// The AdamW scalars of one tensor at step t (the count after this step's increment), formed in
// double and rounded once, as torch's AdamW does with Python floats. The CPU kernel calls this on
// the host and the CUDA kernels on the device, so both round the same way.
LLACA_HOST_DEVICE AdamWScalars adamw_scalars(double lr, double beta1, double beta2,
                                             double weight_decay, double eps, double t) {
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - lr * weight_decay);
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.eps = static_cast<float>(eps);
  s.step_size = static_cast<float>(lr / (1.0 - std::pow(beta1, t)));
  s.bias_correction2_sqrt = static_cast<float>(std::sqrt(1.0 - std::pow(beta2, t)));
  return s;
}

// The balance weight of one tensor from its three L1 reductions (docs/spec.md section 2):
//   alpha = scale * (1 + b) / (a * c), replaced by base_weight unless 0 < alpha < 1.
// The comparison is written so that NaN (0/0, inf/inf, non-finite gradients) falls back too.
// Returns true when it fell back.
template <typename acc_t>
LLACA_HOST_DEVICE bool balance_weight(acc_t a, acc_t b, acc_t c, acc_t scale, acc_t base_weight,
                                      acc_t& alpha) {
  const acc_t candidate = scale * (acc_t(1) + b) / (a * c);
  if (candidate > acc_t(0) && candidate < acc_t(1)) {
    alpha = candidate;
    return false;
  }
  alpha = base_weight;
  return true;
}

// One tensor's alpha and fallback flag at the end of its step: base_weight (fell back) on its
// first LLaCA step, when there is no previous gradient yet (docs/spec.md section 2's `else` branch), else
// balance_weight of its whole-tensor sums. `elements` divides the three sums first: 1 for the
// published L1 sums, the tensor's element count for the size-invariant L1 means (norms="mean",
// docs/spec.md section 2); x / 1.0 is exact, so the sums mode is unchanged. Returns the fallback flag.
LLACA_HOST_DEVICE bool tensor_alpha(bool fresh, double a, double b, double c, double elements,
                                    double scale, double base_weight, float& alpha_out) {
  double alpha = base_weight;
  const bool fell_back =
      fresh || balance_weight<double>(a / elements, b / elements, c / elements, scale,
                                      base_weight, alpha);
  alpha_out = static_cast<float>(fell_back ? base_weight : alpha);
  return fell_back;
}

}  // namespace llaca
