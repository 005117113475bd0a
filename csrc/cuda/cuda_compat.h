// The few macros and host helpers through which csrc/cuda/*.cu use CUDA, so
// that the same files compile with nvcc (the real kernels, registered for the
// CUDA dispatch key of `instseg`) and, with INSTSEG_CUDA_EMULATION defined, as
// plain C++ against the CPU emulation in csrc/emulation/ (registered for the
// CPU key of the separate `instseg_emu` namespace; see tests/emulation/).
//
//   INSTSEG_LAUNCH(kernel, grid, block, smem, stream, args...)
//       kernel<<<grid, block, smem, stream>>>(args...); a template kernel goes
//       in parentheses: INSTSEG_LAUNCH((k<T, U>), ...).
//   INSTSEG_DYNAMIC_SHARED(type, name, align)
//       extern __shared__ __align__(align) type name[];
//   INSTSEG_CUDA_LIBRARY_IMPL(m)
//       TORCH_LIBRARY_IMPL(instseg, CUDA, m)
//   cuda_compat::DeviceGuard, current_stream(), stream_capturing(),
//   on_kernel_device(t), multiprocessor_count(), budget(name, default).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <cstdlib>

#ifdef INSTSEG_CUDA_EMULATION
#include "../emulation/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#endif

#ifdef INSTSEG_CUDA_EMULATION
#define INSTSEG_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::instseg_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#define INSTSEG_DYNAMIC_SHARED(type, name, align) \
  type* const name = ::instseg_emu::dynamic_shared<type>(align)
#define INSTSEG_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(instseg_emu, CPU, m)
#else
#define INSTSEG_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define INSTSEG_DYNAMIC_SHARED(type, name, align) extern __shared__ __align__(align) type name[]
#define INSTSEG_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(instseg, CUDA, m)
#endif

namespace instseg {
namespace cuda_compat {

#ifdef INSTSEG_CUDA_EMULATION
// Emulated kernels run synchronously on the calling thread, on CPU tensors.
struct DeviceGuard {
  explicit DeviceGuard(const c10::Device&) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool stream_capturing() { return false; }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
inline int multiprocessor_count() { return ::instseg_emu::config().sm_count; }
#else
using DeviceGuard = c10::cuda::OptionalCUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
// Whether the current stream is being captured into a CUDA graph (no host
// synchronisation allowed then).
inline bool stream_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
inline int multiprocessor_count() {
  int device = 0, sms = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}
#endif

// A hard-coded budget (bytes, elements) that tests may lower through the
// environment variable `name` (a positive integer) to exercise the code paths
// that large inputs take, e.g. the nms chunk loop. `fallback` otherwise.
inline int64_t budget(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  const long long b = std::strtoll(v, &end, 10);
  TORCH_CHECK(end != v && *end == '\0' && b > 0, name, " must be a positive integer, got '", v, "'");
  return static_cast<int64_t>(b);
}

}  // namespace cuda_compat
}  // namespace instseg
