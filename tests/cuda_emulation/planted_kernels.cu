// Tiny CUDA kernels with planted bugs, written like csrc/cuda/*.cu (through
// cuda_compat.h), compiled only into the emulation library (tests/emu_utils.py)
// as the op instseg_emu::_planted(name, x). tests/test_cuda_emulation_harness.py
// checks that the emulation catches every one of them; the lines marked
// "PLANTED:" are looked up by the test in its error messages.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

#include "../../csrc/cuda/cuda_compat.h"

namespace instseg {
namespace {

constexpr int kN = 64;

// Reads one element past a static shared array: thread 63 reads tile[64].
__global__ void oob_static_shared_kernel(const float* __restrict__ in, float* __restrict__ out) {
  __shared__ float tile[kN];
  tile[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x + 1];  // PLANTED: oob_static_shared
}

// The same past the end of dynamic shared memory (launched with kN floats).
__global__ void oob_dynamic_shared_kernel(const float* __restrict__ in, float* __restrict__ out) {
  INSTSEG_DYNAMIC_SHARED(float, tile, 16);
  tile[threadIdx.x] = in[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x + 1];  // PLANTED: oob_dynamic_shared
}

// One element past the output tensor.
__global__ void oob_global_kernel(const float* __restrict__ in, float* __restrict__ out) {
  out[threadIdx.x + 1] = in[threadIdx.x];  // PLANTED: oob_global
}

// Shift by one through shared memory, with or without the barrier between
// the writes and the reads. Without it, index order happens to work (thread
// i - 1 has written before thread i reads); reverse and random orders do not.
template <bool kSync>
__global__ void shift_kernel(const float* __restrict__ in, float* __restrict__ out) {
  __shared__ float tile[256];
  tile[threadIdx.x] = in[threadIdx.x];
  if (kSync) __syncthreads();
  out[threadIdx.x] = threadIdx.x > 0 ? tile[threadIdx.x - 1] : 0.f;  // PLANTED: missing_barrier
}

// A warp vote in divergent branches: two different call sites.
__global__ void divergent_vote_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const float v = in[threadIdx.x];
  unsigned b;
  if (threadIdx.x % 2 == 0) {
    b = __ballot_sync(0xffffffffu, v > 0.f);  // PLANTED: divergent_vote_even
  } else {
    b = __ballot_sync(0xffffffffu, v > 0.5f);  // PLANTED: divergent_vote_odd
  }
  out[threadIdx.x] = static_cast<float>(__popc(b));
}

// Lane 5 has returned when the others shuffle with a full mask.
__global__ void exited_lane_kernel(const float* __restrict__ in, float* __restrict__ out) {
  if (threadIdx.x == 5) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, in[threadIdx.x], 1);  // PLANTED: exited_lane
}

// __syncthreads in divergent branches.
__global__ void divergent_barrier_kernel(const float* __restrict__ in, float* __restrict__ out) {
  if (threadIdx.x < 32) {
    __syncthreads();  // PLANTED: divergent_barrier_a
  } else {
    __syncthreads();  // PLANTED: divergent_barrier_b
  }
  out[threadIdx.x] = in[threadIdx.x];
}

// Lane 0 shuffles with lane 1 while lane 1 waits at a block barrier.
__global__ void deadlock_kernel(const float* __restrict__ in, float* __restrict__ out) {
  float v = in[threadIdx.x];
  if (threadIdx.x == 0) v = __shfl_sync(0x3u, v, 1);  // PLANTED: deadlock_shfl
  else __syncthreads();  // PLANTED: deadlock_barrier
  out[threadIdx.x] = v;
}

// A correct warp reduction, as a control: lane 0 gets the warp's sum
// (__shfl_down_sync on float), every lane the sum of the warp's thread indices
// (__shfl_xor_sync on int64, then __shfl_sync from lane 0), plus the votes
// 1000 * any(x > 0) + 10000 * all(x > -1e30).
__global__ void warp_sum_kernel(const float* __restrict__ in, float* __restrict__ out) {
  const float x = in[threadIdx.x];
  float v = x;
  int64_t i = threadIdx.x;
  for (int off = 16; off > 0; off >>= 1) {
    v += __shfl_down_sync(0xffffffffu, v, off);
    i += __shfl_xor_sync(0xffffffffu, i, off);
  }
  i = __shfl_sync(0xffffffffu, i, 0);
  const int any = __any_sync(0xffffffffu, x > 0.f), all = __all_sync(0xffffffffu, x > -1e30f);
  const float votes = static_cast<float>(1000 * any + 10000 * all);
  out[threadIdx.x] = (threadIdx.x % 32 == 0 ? v : static_cast<float>(i)) + votes;
}

at::Tensor planted(const std::string& name, const at::Tensor& x_) {
  const at::Tensor x = x_.to(at::kFloat).contiguous();
  const int n = static_cast<int>(x.numel());
  at::Tensor out = at::zeros({n}, x.options());
  const float* in = x.const_data_ptr<float>();
  float* o = out.mutable_data_ptr<float>();
  const cudaStream_t stream = cuda_compat::current_stream();
  if (name == "oob_static_shared") {
    INSTSEG_LAUNCH(oob_static_shared_kernel, 1, kN, 0, stream, in, o);
  } else if (name == "oob_dynamic_shared") {
    INSTSEG_LAUNCH(oob_dynamic_shared_kernel, 1, kN, kN * sizeof(float), stream, in, o);
  } else if (name == "oob_global") {
    INSTSEG_LAUNCH(oob_global_kernel, 1, n, 0, stream, in, o);
  } else if (name == "missing_barrier") {
    INSTSEG_LAUNCH((shift_kernel<false>), 1, n, 0, stream, in, o);
  } else if (name == "with_barrier") {
    INSTSEG_LAUNCH((shift_kernel<true>), 1, n, 0, stream, in, o);
  } else if (name == "divergent_vote") {
    INSTSEG_LAUNCH(divergent_vote_kernel, 1, n, 0, stream, in, o);
  } else if (name == "exited_lane") {
    INSTSEG_LAUNCH(exited_lane_kernel, 1, n, 0, stream, in, o);
  } else if (name == "divergent_barrier") {
    INSTSEG_LAUNCH(divergent_barrier_kernel, 1, n, 0, stream, in, o);
  } else if (name == "deadlock") {
    INSTSEG_LAUNCH(deadlock_kernel, 1, n, 0, stream, in, o);
  } else if (name == "warp_sum") {
    INSTSEG_LAUNCH(warp_sum_kernel, 1, n, 0, stream, in, o);
  } else if (name == "too_many_threads") {
    INSTSEG_LAUNCH(oob_global_kernel, 1, 2048, 0, stream, in, o);
  } else if (name == "grid_too_high") {
    INSTSEG_LAUNCH(oob_global_kernel, dim3(1, 70000), 1, 0, stream, in, o);
  } else if (name == "too_much_shared") {
    INSTSEG_LAUNCH(oob_dynamic_shared_kernel, 1, kN, 49 * 1024, stream, in, o);
  } else if (name == "empty_grid") {
    INSTSEG_LAUNCH(oob_global_kernel, 0, kN, 0, stream, in, o);
  } else {
    TORCH_CHECK(false, "_planted: unknown kernel '", name, "'");
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace instseg

TORCH_LIBRARY_FRAGMENT(instseg_emu, m) {
  m.def("_planted(str name, Tensor x) -> Tensor", &instseg::planted);
}
