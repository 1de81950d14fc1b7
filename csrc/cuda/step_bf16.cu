// The kernels of c10::BFloat16 parameters (see kernels.cuh).
#include "gpu_launch.cuh"

namespace llaca {
namespace cuda {

void launch_bf16(const CallShape& shape, const StepArgs& args, cudaStream_t stream) {
  launch_on_gpu<c10::BFloat16>(shape, args, stream);
}

}  // namespace cuda
}  // namespace llaca
