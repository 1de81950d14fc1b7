// The GPU launches of each parameter dtype, one translation unit each (step_<dtype>.cu, which
// instantiate this template), so that nvcc compiles the dtypes' kernels in parallel.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_runtime_api.h>

#include "kernel_args.h"

namespace llaca {
namespace cuda {

template <typename param_t>
void launch_on_gpu(const CallShape& shape, const StepArgs& args, cudaStream_t stream);

extern template void launch_on_gpu<float>(const CallShape&, const StepArgs&, cudaStream_t);
extern template void launch_on_gpu<c10::BFloat16>(const CallShape&, const StepArgs&, cudaStream_t);
extern template void launch_on_gpu<c10::Half>(const CallShape&, const StepArgs&, cudaStream_t);

}  // namespace cuda
}  // namespace llaca
