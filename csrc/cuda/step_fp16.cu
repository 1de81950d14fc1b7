// The kernels of c10::Half parameters (see kernels.cuh).
#include "gpu_launch.cuh"

namespace llaca {
namespace cuda {

void launch_fp16(const CallShape& shape, const StepArgs& args, cudaStream_t stream) {
  launch_on_gpu<c10::Half>(shape, args, stream);
}

}  // namespace cuda
}  // namespace llaca
