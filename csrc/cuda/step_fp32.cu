// The kernels of float parameters (see kernels.cuh).
#include "gpu_launch.cuh"

template void llaca::cuda::launch_on_gpu<float>(const llaca::cuda::CallShape&,
                                               const llaca::cuda::StepArgs&, cudaStream_t);
