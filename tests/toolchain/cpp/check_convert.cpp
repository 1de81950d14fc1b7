// Checks csrc/cpu/convert.h against c10's own conversions; built and run by
// tests/toolchain/test_cpu_convert.py. Prints one line per kind of check and exits non-zero on a mismatch.
// Any NaN matches any NaN (payloads are not part of the contract); everything else must match bit
// for bit.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "convert.h"

using namespace llaca::cpu;

static uint32_t bits_of(float f) { return float_to_bits(f); }

static int failures = 0;

static void report(const char* what, long checked, long bad, uint32_t example) {
  std::printf("%-28s checked %12ld  mismatches %ld", what, checked, bad);
  if (bad) std::printf("  (first input bits 0x%08x)", example);
  std::printf("\n");
  failures += bad != 0;
}

// Converts a batch with the vectorisable functions in a loop (as the kernels do), then compares
// element by element with the c10 conversions.
static void check_narrowing(const char* what, const std::vector<float>& in) {
  const long n = static_cast<long>(in.size());
  std::vector<uint16_t> bf(n), hf(n);
  for (long i = 0; i < n; ++i) bf[i] = float_to_bf16(in[i]);
  for (long i = 0; i < n; ++i) hf[i] = float_to_half(in[i]);
  long bad_bf = 0, bad_hf = 0;
  uint32_t ex_bf = 0, ex_hf = 0;
  for (long i = 0; i < n; ++i) {
    const float x = in[i];
    const uint16_t want_bf = c10::BFloat16(x).x;
    const uint16_t want_hf = c10::Half(x).x;
    const bool nan = std::isnan(x);
    const bool ok_bf = nan ? std::isnan(bf16_to_float(bf[i])) : bf[i] == want_bf;
    const bool ok_hf = nan ? std::isnan(half_to_float(hf[i])) : hf[i] == want_hf;
    if (!ok_bf && bad_bf++ == 0) ex_bf = bits_of(x);
    if (!ok_hf && bad_hf++ == 0) ex_hf = bits_of(x);
  }
  if (what == nullptr) {  // a later batch of a check already reported: speak only on failure
    failures += (bad_bf != 0) + (bad_hf != 0);
    if (bad_bf || bad_hf) std::printf("batch mismatch at 0x%08x / 0x%08x\n", ex_bf, ex_hf);
    return;
  }
  char label[64];
  std::snprintf(label, sizeof label, "fp32->bf16 %s", what);
  report(label, n, bad_bf, ex_bf);
  std::snprintf(label, sizeof label, "fp32->fp16 %s", what);
  report(label, n, bad_hf, ex_hf);
}

int main() {
  // Widening: all 65536 patterns of each 16-bit type.
  {
    std::vector<uint16_t> all(65536);
    for (uint32_t i = 0; i < 65536; ++i) all[i] = static_cast<uint16_t>(i);
    std::vector<float> from_bf(65536), from_hf(65536);
    for (int i = 0; i < 65536; ++i) from_bf[i] = bf16_to_float(all[i]);
    for (int i = 0; i < 65536; ++i) from_hf[i] = half_to_float(all[i]);
    long bad_bf = 0, bad_hf = 0;
    uint32_t ex_bf = 0, ex_hf = 0;
    for (uint32_t i = 0; i < 65536; ++i) {
      c10::BFloat16 b;
      b.x = static_cast<uint16_t>(i);
      c10::Half h;
      h.x = static_cast<uint16_t>(i);
      const float want_b = static_cast<float>(b), want_h = static_cast<float>(h);
      const bool ok_b = std::isnan(want_b) ? std::isnan(from_bf[i]) : bits_of(want_b) == bits_of(from_bf[i]);
      const bool ok_h = std::isnan(want_h) ? std::isnan(from_hf[i]) : bits_of(want_h) == bits_of(from_hf[i]);
      if (!ok_b && bad_bf++ == 0) ex_bf = i;
      if (!ok_h && bad_hf++ == 0) ex_hf = i;
    }
    report("bf16->fp32 all patterns", 65536, bad_bf, ex_bf);
    report("fp16->fp32 all patterns", 65536, bad_hf, ex_hf);
  }
  // Narrowing, rounding boundaries: for every value of the bits that survive, the dropped bits
  // set to zero, one, just below / at / just above the halfway point, and all ones.
  {
    std::vector<float> in;
    const uint32_t bf_low[] = {0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF};
    for (uint32_t high = 0; high < 65536; ++high)
      for (uint32_t low : bf_low) in.push_back(bits_to_float((high << 16) | low));
    const uint32_t hf_low[] = {0x0000, 0x0001, 0x0FFF, 0x1000, 0x1001, 0x1FFF};
    for (uint32_t high = 0; high < (1u << 19); ++high)
      for (uint32_t low : hf_low) in.push_back(bits_to_float((high << 13) | low));
    check_narrowing("rounding edges", in);
  }
  // Narrowing, every fp32 value whose fp16 result is subnormal or the smallest normal
  // (|x| in [2^-26, 2^-14), both signs): there the number of dropped bits varies. In batches,
  // to keep memory small.
  {
    const uint32_t lo = 101u << 23, hi = 113u << 23, batch = 1u << 22;
    std::vector<float> in;
    for (uint32_t start = lo; start < hi; start += batch) {
      in.clear();
      for (uint32_t u = start; u < start + batch && u < hi; ++u) {
        in.push_back(bits_to_float(u));
        in.push_back(bits_to_float(u | 0x80000000u));
      }
      check_narrowing(start == lo ? "fp16 subnormal range" : nullptr, in);
    }
  }
  // Narrowing, random bit patterns (all exponents, NaNs and infinities included).
  {
    std::mt19937 rng(12345);
    std::vector<float> in(1 << 24);
    for (float& x : in) x = bits_to_float(static_cast<uint32_t>(rng()));
    check_narrowing("random patterns", in);
  }
  std::printf(failures ? "FAILED\n" : "OK\n");
  return failures ? 1 : 0;
}
