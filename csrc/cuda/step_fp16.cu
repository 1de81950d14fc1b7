// The kernels of c10::Half parameters (see kernels.cuh).
#include "gpu_launch.cuh"

template void llaca::cuda::launch_on_gpu<c10::Half>(const llaca::cuda::CallShape&,
                                               const llaca::cuda::StepArgs&, cudaStream_t);
