// The GPU's Launcher for launch_call (kernels.cuh): a triple-chevron launch on the call's stream,
// checked at once. Included by the step_<dtype>.cu files only.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>

#include "kernels.cuh"
#include "launch.h"

namespace llaca {
namespace cuda {

struct GpuLauncher {
  cudaStream_t stream;

  void operator()(void (*kernel)(StepArgs), int64_t blocks, const StepArgs& args) const {
    TORCH_CHECK(blocks <= int64_t(0x7fffffff), "llaca_optim: a call of ", blocks,
                " chunks exceeds the grid of one launch; split the parameters into groups");
    kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// The definition that each step_<dtype>.cu instantiates for its dtype.
template <typename param_t>
void launch_on_gpu(const CallShape& shape, const StepArgs& args, cudaStream_t stream) {
  GpuLauncher launcher{stream};
  launch_call<param_t>(shape, args, launcher);
}

}  // namespace cuda
}  // namespace llaca
