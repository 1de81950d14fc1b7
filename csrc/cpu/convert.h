// Storage <-> fp32 conversions for the CPU kernels, written so that GCC and Clang vectorise them.
//
// Why not c10::BFloat16 / c10::Half: their conversions go through a struct and, for fp16, through
// the scalar F16C instruction or a function with branches. Inside the element loop of
// llaca_cpu.cpp that kept the whole loop scalar (the bf16 step ran 4.7x slower than torch's fused
// AdamW, see benchmarks/results/). The functions here work on the raw 16-bit patterns with integer
// arithmetic and selects only, so the loop vectorises with whatever vector ISA the build targets.
//
// Results are bit-identical to c10's conversions for every input except the payload of NaNs
// (any NaN stays a NaN). tests/toolchain/test_cpu_convert.py checks this exhaustively for all 65536 16-bit
// patterns and for fp32 edge cases plus a large random sample.
#pragma once

#include <cstdint>
#include <bit>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

namespace llaca {
namespace cpu {

inline float bits_to_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t float_to_bits(float f) { return std::bit_cast<uint32_t>(f); }

// bfloat16 is the top half of an fp32: widening is a shift.
inline float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }

// fp32 -> bfloat16 with round-to-nearest-even; NaN becomes the canonical quiet NaN.
inline uint16_t float_to_bf16(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return f != f ? uint16_t(0x7FC0) : uint16_t(rounded);
}

// IEEE binary16 -> fp32 (exact).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t magnitude = h & 0x7FFFu;
  // Normal numbers: move exponent and mantissa into place and rebias the exponent (15 -> 127).
  uint32_t widened = (magnitude << 13) + (112u << 23);
  // Inf and NaN: the exponent field must become all ones (another +112 on top of the rebias).
  widened = magnitude >= 0x7C00u ? widened + (112u << 23) : widened;
  // Zero and subnormals: the 10-bit mantissa counts units of 2^-24; the conversion is exact.
  const float subnormal = static_cast<float>(static_cast<int32_t>(magnitude)) * 0x1p-24f;
  const uint32_t result = magnitude < 0x0400u ? float_to_bits(subnormal) : widened;
  return bits_to_float(result | sign);
}

// fp32 -> IEEE binary16 with round-to-nearest-even, overflow to infinity, gradual underflow.
inline uint16_t float_to_half(float f) {
  const uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t magnitude = u & 0x7FFFFFFFu;
  // Normal range: drop 13 mantissa bits with round-to-nearest-even, then rebias (127 -> 15).
  // Values that round up past 65504 come out as 0x7C00 (infinity) by themselves.
  const uint32_t rounded = (magnitude + 0x0FFFu + ((magnitude >> 13) & 1u)) >> 13;
  const uint32_t normal = rounded - (112u << 10);
  // Below 2^-14 the result is subnormal: adding 0.5f aligns the value to units of 2^-24 and lets
  // the FPU round to nearest even; the low bits are then the half's mantissa.
  const float aligned = bits_to_float(magnitude) + 0.5f;
  const uint32_t subnormal = float_to_bits(aligned) - 0x3F000000u;
  uint32_t out = magnitude < 0x38800000u ? subnormal : normal;
  out = magnitude >= 0x47800000u ? 0x7C00u : out;  // 65536 and above, and infinity
  out = magnitude > 0x7F800000u ? 0x7E00u : out;   // NaN
  return uint16_t(out | sign);
}

// How a storage dtype is read and written by the element loops: `raw` is the type of the memory
// (a 16-bit pattern for the half types, so no struct conversion sits in the loop).
template <typename T>
struct Codec;

template <>
struct Codec<float> {
  using raw = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};

template <>
struct Codec<c10::BFloat16> {
  using raw = uint16_t;
  static float load(uint16_t x) { return bf16_to_float(x); }
  static uint16_t store(float x) { return float_to_bf16(x); }
};

template <>
struct Codec<c10::Half> {
  using raw = uint16_t;
  static float load(uint16_t x) { return half_to_float(x); }
  static uint16_t store(float x) { return float_to_half(x); }
};

}  // namespace cpu
}  // namespace llaca
