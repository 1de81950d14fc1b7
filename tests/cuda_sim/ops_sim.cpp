// The CUDA backend's kernels (csrc/cuda/kernels.cuh) and host code (csrc/cuda/ops.h, workspace.h)
// run on CPU tensors through the emulation in cuda_sim.h, registered as the test-only ops
// llaca_optim_sim::adamw_llaca_ / llaca_update_ (same schemas as llaca_optim's, defined by
// tests/support/cuda_sim.py before this library is loaded). Only the Runtime below differs from the GPU
// build's (csrc/cuda/ops_cuda.cpp): "device" memory is host memory and a launch is emulated.
#include "cuda_sim.h"  // first: it stands in for the CUDA toolkit

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "kernels.cuh"
#include "ops.h"

namespace llaca {
namespace cuda {
namespace {

struct SimLauncher {
  void operator()(void (*kernel)(StepArgs), int64_t blocks, const StepArgs& args) const {
    llaca_sim::launch(kernel, blocks, args, kThreads);
  }
};

struct SimRuntime {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CPU;
  static constexpr const char* kName = "emulated cuda";
  using Stream = int;
  using Event = int;
  struct Guard {
    explicit Guard(const c10::Device&) {}
  };

  static Stream current_stream(const c10::Device&) { return 0; }
  static bool capturing(Stream) { return false; }
  static at::Tensor host_buffer(int64_t bytes, bool) {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  }
  static void upload(const at::Tensor& host, at::Tensor& device, int64_t bytes, Stream, bool) {
    std::memcpy(device.data_ptr(), host.data_ptr(), static_cast<size_t>(bytes));
  }
  static Event record(Stream) { return 1; }
  static bool done(Event&) { return true; }
  static void destroy(Event&) {}

  static void launch(at::ScalarType dtype, const CallShape& shape, const StepArgs& args, Stream) {
    SimLauncher launcher;
    with_param_type(dtype, [&](auto t) {
      launch_call<typename decltype(t)::type>(shape, args, launcher);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(llaca_optim_sim, CPU, m) {
  m.impl("adamw_llaca_", &Ops<SimRuntime>::adamw_llaca);
  m.impl("llaca_update_", &Ops<SimRuntime>::llaca_update);
  m.impl("llaca_flush_", &Ops<SimRuntime>::llaca_flush);
}

}  // namespace cuda
}  // namespace llaca
