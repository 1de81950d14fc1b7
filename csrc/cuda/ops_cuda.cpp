// The CUDA runtime of the ops (ops.h) and their registration for the CUDA dispatch key, under the
// schemas declared in llaca_optim/ops/library.py. Host code only: the kernels are in step_<dtype>.cu.
//
// Includes stay to c10's CUDA stream, guard and exception headers (plus the CUDA runtime API):
// ATen/cuda/CUDAContext.h would pull in cuBLAS and cuSPARSE headers that the CPU wheel of torch,
// with which CI compiles this file, does not ship.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>

#include "launch.h"
#include "ops.h"

namespace llaca {
namespace cuda {
namespace {

struct CudaRuntime {
  static constexpr c10::DeviceType kDeviceType = c10::DeviceType::CUDA;
  static constexpr const char* kName = "cuda";
  using Stream = cudaStream_t;
  using Event = cudaEvent_t;
  using Guard = c10::cuda::CUDAGuard;

  static Stream current_stream(const c10::Device& device) {
    return c10::cuda::getCurrentCUDAStream(device.index()).stream();
  }

  static bool capturing(Stream stream) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
    return status != cudaStreamCaptureStatusNone;
  }

  // Pinned, so the upload is a true asynchronous copy. Not while capturing: a pinned allocation
  // may call cudaHostAlloc, which a capture forbids; that upload is synchronous anyway (below).
  static at::Tensor host_buffer(int64_t bytes, bool capturing) {
    return at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(!capturing));
  }

  static void upload(const at::Tensor& host, at::Tensor& device, int64_t bytes, Stream stream,
                     bool capturing) {
    if (!capturing) {
      C10_CUDA_CHECK(cudaMemcpyAsync(device.data_ptr(), host.data_ptr(),
                                     static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream));
      return;
    }
    // NOTE [CUDA workspace]: during a capture the tables are copied once, outside the graph, on a
    // stream that is not capturing; relaxed mode lets this thread do that mid-capture. The
    // captured kernels run only at replay, long after this copy has completed.
    RelaxedCaptureMode relaxed;  // restored on every way out, errors included
    cudaStream_t side = side_stream();
    C10_CUDA_CHECK(cudaMemcpyAsync(device.data_ptr(), host.data_ptr(), static_cast<size_t>(bytes),
                                   cudaMemcpyHostToDevice, side));
    C10_CUDA_CHECK(cudaStreamSynchronize(side));
  }

  // This thread's capture mode set to relaxed for the lifetime of the object.
  struct RelaxedCaptureMode {
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    RelaxedCaptureMode() { C10_CUDA_CHECK(cudaThreadExchangeStreamCaptureMode(&mode)); }
    ~RelaxedCaptureMode() { (void)cudaThreadExchangeStreamCaptureMode(&mode); }
  };

  // A non-blocking stream of the current device for uploads made during a capture.
  static cudaStream_t side_stream() {
    static std::mutex lock;
    static std::unordered_map<int, cudaStream_t> sides;  // one per device, made on first use
    int index = 0;
    C10_CUDA_CHECK(cudaGetDevice(&index));  // the call's device (its guard is active)
    std::lock_guard<std::mutex> hold(lock);
    cudaStream_t& slot = sides[index];
    if (slot == nullptr) C10_CUDA_CHECK(cudaStreamCreateWithFlags(&slot, cudaStreamNonBlocking));
    return slot;
  }

  static Event record(Stream stream) {
    Event event = nullptr;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    C10_CUDA_CHECK(cudaEventRecord(event, stream));
    return event;
  }

  static bool done(Event& event) {
    if (event == nullptr) return true;
    const cudaError_t state = cudaEventQuery(event);
    if (state == cudaErrorNotReady) {
      (void)cudaGetLastError();  // not an error: clear it
      return false;
    }
    C10_CUDA_CHECK(state);
    return true;
  }

  static void destroy(Event& event) {
    if (event != nullptr) C10_CUDA_CHECK(cudaEventDestroy(event));
    event = nullptr;
  }

  static void launch(at::ScalarType dtype, const CallShape& shape, const StepArgs& args,
                     Stream stream) {
    with_param_type(dtype, [&](auto t) {
      launch_on_gpu<typename decltype(t)::type>(shape, args, stream);
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(llaca_optim, CUDA, m) {
  m.impl("adamw_llaca_", &Ops<CudaRuntime>::adamw_llaca);
  m.impl("llaca_update_", &Ops<CudaRuntime>::llaca_update);
  m.impl("llaca_flush_", &Ops<CudaRuntime>::llaca_flush);
}

}  // namespace cuda
}  // namespace llaca
