// A CPU emulation of the few CUDA features csrc/cuda/kernels.cuh uses, so the tests can run those
// kernels, unchanged, on a machine without a GPU (CI's). Include it before kernels.cuh.
//
// Model: one thread block at a time, in a shuffled order (a kernel must not depend on the order
// of its blocks; the arrival protocol of the step kernel is exercised with a different last block
// each launch). The threads of a block are fibers on the calling thread, switched at every
// __syncthreads and warp shuffle, so shared memory is a plain static variable. A fiber waiting at
// __syncthreads resumes once every live thread of the block waits there; one in a shuffle, once
// every live thread of its warp is in one (the values go through a double-buffered exchange). A
// block whose threads can never all meet aborts with a message, as a GPU would hang.
//
// What it cannot show: timing, memory-model bugs that only weaker orderings expose, and anything
// about the real compiler (tests/toolchain/test_cuda_compile.py compiles every .cu with nvcc for that).
#pragma once

#define LLACA_CUDA_SIM 1

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float __uint_as_float(uint32_t u) { return std::bit_cast<float>(u); }
inline uint32_t __float_as_uint(float f) { return std::bit_cast<uint32_t>(f); }

#define __global__
#define __launch_bounds__(...)
#define __shared__ static

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace llaca_sim {

constexpr size_t kStackBytes = 256 * 1024;

enum class State { kReady, kAtBarrier, kInShuffle, kDone };

struct Fiber {
  std::vector<char> stack = std::vector<char>(kStackBytes);
  void* sp = nullptr;
  State state = State::kReady;
  unsigned warp_width = 0;  // of its pending shuffle
  unsigned shuffles = 0;  // which half of the exchange buffer its next shuffle uses
#if !defined(__x86_64__)
  ucontext_t context;
#endif
};

struct Block {
  std::vector<Fiber> fibers;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_context;
#endif
  unsigned current = 0;
  std::function<void()> body;
  std::vector<unsigned char> exchange[2];
};

inline Block& block() {
  static Block b;
  return b;
}

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save, loads
// `load` and restores the registers saved there (System V x86-64 ABI): ~10 ns per switch, against
// ~300 ns for swapcontext, which also saves the signal mask with a system call.
extern "C" void llaca_sim_switch(void** save, void* load);
asm(R"(
  .text
  .globl llaca_sim_switch
  .type llaca_sim_switch, @function
llaca_sim_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size llaca_sim_switch, .-llaca_sim_switch
  .section .note.GNU-stack,"",@progbits
  .text
)");
#endif

inline void to_scheduler() {
  Block& b = block();
#if defined(__x86_64__)
  llaca_sim_switch(&b.fibers[b.current].sp, b.scheduler_sp);
#else
  swapcontext(&b.fibers[b.current].context, &b.scheduler_context);
#endif
}

inline void fiber_main() {
  Block& b = block();
  b.body();
  b.fibers[b.current].state = State::kDone;
  to_scheduler();  // never resumed
  std::abort();
}

inline void start_fiber(Fiber& f) {
  f.state = State::kReady;
  f.shuffles = 0;
#if defined(__x86_64__)
  // A frame that llaca_sim_switch "returns" into fiber_main from: six zero registers, then
  // fiber_main's address, then a null return address for fiber_main itself, which leaves the
  // stack aligned as the ABI requires at a function's entry.
  auto top = reinterpret_cast<uintptr_t>(f.stack.data() + f.stack.size()) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int r = 0; r < 6; ++r) *--sp = nullptr;
  f.sp = sp;
#else
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack.data();
  f.context.uc_stack.ss_size = f.stack.size();
  f.context.uc_link = nullptr;
  makecontext(&f.context, &fiber_main, 0);
#endif
}

inline void resume(unsigned i) {
  Block& b = block();
  b.current = i;
  threadIdx.x = i;
#if defined(__x86_64__)
  llaca_sim_switch(&b.scheduler_sp, b.fibers[i].sp);
#else
  swapcontext(&b.scheduler_context, &b.fibers[i].context);
#endif
}

// Runs one block: every ready fiber until it waits or ends, then releases the barriers and the
// warps whose threads have all arrived, until every fiber has ended.
inline void run_block(unsigned threads, std::function<void()> body) {
  Block& b = block();
  if (b.fibers.size() < threads) b.fibers.resize(threads);
  b.body = std::move(body);
  for (unsigned i = 0; i < threads; ++i) start_fiber(b.fibers[i]);
  for (;;) {
    for (unsigned i = 0; i < threads; ++i) {
      if (b.fibers[i].state == State::kReady) resume(i);
    }
    bool all_done = true, all_at_barrier = true, released = false;
    for (unsigned i = 0; i < threads; ++i) {
      const State st = b.fibers[i].state;
      all_done = all_done && st == State::kDone;
      all_at_barrier = all_at_barrier && (st == State::kDone || st == State::kAtBarrier);
    }
    if (all_done) return;
    if (all_at_barrier) {
      for (unsigned i = 0; i < threads; ++i) {
        if (b.fibers[i].state == State::kAtBarrier) b.fibers[i].state = State::kReady;
      }
      continue;
    }
    for (unsigned i = 0; i < threads; ++i) {
      if (b.fibers[i].state != State::kInShuffle) continue;
      const unsigned width = b.fibers[i].warp_width;
      const unsigned first = i / width * width;
      bool warp_arrived = true;
      for (unsigned k = first; k < first + width && k < threads; ++k) {
        warp_arrived = warp_arrived &&
                       (b.fibers[k].state == State::kInShuffle || b.fibers[k].state == State::kDone);
      }
      if (!warp_arrived) continue;
      for (unsigned k = first; k < first + width && k < threads; ++k) {
        if (b.fibers[k].state == State::kInShuffle) b.fibers[k].state = State::kReady;
      }
      released = true;
    }
    if (!released) {
      std::fprintf(stderr, "cuda_sim: block %u deadlocks (threads wait at different barriers)\n",
                   blockIdx.x);
      std::abort();
    }
  }
}

// A launch: gridDim.x blocks of `threads` fibers, in a shuffled order that changes every launch.
template <typename Kernel, typename Args>
void launch(Kernel kernel, int64_t blocks, const Args& args, unsigned threads) {
  static std::mt19937_64 order_rng(12345);
  std::vector<int64_t> order(static_cast<size_t>(blocks));
  std::iota(order.begin(), order.end(), int64_t(0));
  std::shuffle(order.begin(), order.end(), order_rng);
  gridDim.x = static_cast<unsigned>(blocks);
  blockDim.x = threads;
  block().exchange[0].assign(threads * 8, 0);
  block().exchange[1].assign(threads * 8, 0);
  for (int64_t b : order) {
    blockIdx.x = static_cast<unsigned>(b);
    run_block(threads, [&] { kernel(args); });
  }
}

}  // namespace llaca_sim

inline void __syncthreads() {
  llaca_sim::Block& b = llaca_sim::block();
  b.fibers[b.current].state = llaca_sim::State::kAtBarrier;
  llaca_sim::to_scheduler();
}
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* address, unsigned value) {
  const unsigned old = *address;
  *address = old + value;
  return old;
}

template <typename T>
T __shfl_xor_sync(unsigned, T value, int lane_mask, int width) {
  static_assert(sizeof(T) <= 8, "the exchange holds 8 bytes per thread");
  llaca_sim::Block& b = llaca_sim::block();
  const unsigned me = threadIdx.x;
  const unsigned partner = me ^ static_cast<unsigned>(lane_mask);  // lane_mask < width: same warp
  std::vector<unsigned char>& buffer = b.exchange[b.fibers[me].shuffles++ % 2];
  std::memcpy(&buffer[8 * me], &value, sizeof(T));
  b.fibers[me].state = llaca_sim::State::kInShuffle;
  b.fibers[me].warp_width = static_cast<unsigned>(width);
  llaca_sim::to_scheduler();
  T result;
  std::memcpy(&result, &buffer[8 * partner], sizeof(T));
  return result;
}
