// The kernels of float parameters (see kernels.cuh).
#include "gpu_launch.cuh"

namespace llaca {
namespace cuda {

void launch_fp32(const CallShape& shape, const StepArgs& args, cudaStream_t stream) {
  launch_on_gpu<float>(shape, args, stream);
}

}  // namespace cuda
}  // namespace llaca
