// The GPU launches of each parameter dtype, one translation unit each (step_<dtype>.cu), so that
// nvcc compiles the dtypes' kernel instantiations in parallel.
#pragma once

#include <cuda_runtime_api.h>

#include "layout.h"

namespace llaca {
namespace cuda {

void launch_fp32(const CallShape& shape, const StepArgs& args, cudaStream_t stream);
void launch_bf16(const CallShape& shape, const StepArgs& args, cudaStream_t stream);
void launch_fp16(const CallShape& shape, const StepArgs& args, cudaStream_t stream);

}  // namespace cuda
}  // namespace llaca
