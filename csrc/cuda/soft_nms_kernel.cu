// Soft-NMS on CUDA: one block of kThreads threads runs the whole selection on
// the device (each step: a block-wide argmax of the alive scores, ties by lower
// index, then a parallel decay pass). No host synchronisation inside; one for
// the number kept. O(N) steps of O(N / kThreads) work each: meant for the box
// counts Soft-NMS is used with (after score filtering), not for 100k+ boxes.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda_compat.h"
#include <torch/library.h>

#include "../nms_checks.h"

namespace instseg {
namespace {

constexpr int kThreads = 1024;

// (score, index) with the larger score, ties by the lower index; index -1 = none.
template <typename T>
__device__ __forceinline__ void better(T& s, int64_t& i, T s2, int64_t i2) {
  if (i2 >= 0 && (i < 0 || s2 > s || (s2 == s && i2 < i))) {
    s = s2;
    i = i2;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) soft_nms_kernel(
    const T* __restrict__ boxes, T* __restrict__ s, bool* __restrict__ alive, int64_t n, T thr,
    T sigma, T score_thr, int64_t method, int64_t* __restrict__ keep, T* __restrict__ keep_score,
    int64_t* __restrict__ count_out) {
  __shared__ T warp_s[kThreads / 32];
  __shared__ int64_t warp_i[kThreads / 32];
  __shared__ int64_t sel;
  __shared__ T sel_score;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const T* b = boxes + i * 4;
    alive[i] = isfinite(s[i]) && s[i] >= score_thr && isfinite(b[0]) && isfinite(b[1]) &&
        isfinite(b[2]) && isfinite(b[3]);
  }
  __syncthreads();
  int64_t count = 0;
  while (true) {
    T best = 0;
    int64_t bi = -1;
    for (int64_t i = threadIdx.x; i < n; i += kThreads)
      if (alive[i]) better(best, bi, s[i], i);
    for (int off = 16; off > 0; off >>= 1) {
      const T s2 = __shfl_down_sync(0xffffffffu, best, off);
      const int64_t i2 = __shfl_down_sync(0xffffffffu, bi, off);
      better(best, bi, s2, i2);
    }
    if (lane == 0) {
      warp_s[warp] = best;
      warp_i[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      T bs = 0;
      int64_t b = -1;
      for (int w = 0; w < kThreads / 32; ++w) better(bs, b, warp_s[w], warp_i[w]);
      sel = b;
      sel_score = bs;
      if (b >= 0) {
        keep[count] = b;
        keep_score[count] = bs;
        alive[b] = false;
      }
    }
    __syncthreads();
    const int64_t m = sel;
    if (m < 0) break;
    ++count;
    const T* mb = boxes + m * 4;
    const T marea = (mb[2] - mb[0]) * (mb[3] - mb[1]);
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      if (!alive[i]) continue;
      const T* b = boxes + i * 4;
      const T w = max(T(0), min(mb[2], b[2]) - max(mb[0], b[0]));
      const T h = max(T(0), min(mb[3], b[3]) - max(mb[1], b[1]));
      const T inter = w * h;
      const T iou = inter / (marea + (b[2] - b[0]) * (b[3] - b[1]) - inter);
      T v = s[i];
      if (method == 0) {
        if (iou > thr) v *= T(1) - iou;
      } else {
        v *= exp(-(iou * iou) / sigma);
      }
      s[i] = v;
      if (!(v >= score_thr)) alive[i] = false;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) count_out[0] = count;
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cuda(const at::Tensor& boxes_, const at::Tensor& scores_,
                                                 double iou_threshold, double sigma,
                                                 double score_threshold, int64_t method) {
  check_soft_nms_args(boxes_, scores_, iou_threshold, sigma, score_threshold, method);
  TORCH_CHECK(cuda_compat::on_kernel_device(boxes_), "soft_nms: CUDA kernel got ", boxes_.device(), " boxes");
  cuda_compat::DeviceGuard guard(boxes_.device());
  const int64_t n = boxes_.size(0);
  const at::ScalarType acc = acc_dtype(boxes_.scalar_type());
  if (n == 0) {
    return {at::empty({0}, boxes_.options().dtype(at::kLong)), at::empty({0}, scores_.options())};
  }
  const at::Tensor boxes = boxes_.to(acc).contiguous();
  at::Tensor work = scores_.to(acc).clone();  // decayed in place
  at::Tensor alive = at::empty({n}, boxes.options().dtype(at::kBool));
  at::Tensor keep = at::empty({n}, boxes.options().dtype(at::kLong));
  at::Tensor keep_score = at::empty({n}, boxes.options());
  at::Tensor count = at::zeros({1}, boxes.options().dtype(at::kLong));
  const cudaStream_t stream = cuda_compat::current_stream();
  AT_DISPATCH_FLOATING_TYPES(acc, "soft_nms_cuda", [&] {
    INSTSEG_LAUNCH(soft_nms_kernel<scalar_t>, 1, kThreads, 0, stream,
        boxes.data_ptr<scalar_t>(), work.data_ptr<scalar_t>(), alive.data_ptr<bool>(), n,
        threshold_below<scalar_t>(iou_threshold), sigma_as<scalar_t>(sigma),
        threshold_above<scalar_t>(score_threshold), method, keep.data_ptr<int64_t>(),
        keep_score.data_ptr<scalar_t>(), count.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const int64_t k = count.cpu().data_ptr<int64_t>()[0];
  return {keep.narrow(0, 0, k).contiguous(), keep_score.narrow(0, 0, k).to(scores_.scalar_type())};
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("soft_nms", TORCH_FN(soft_nms_cuda));
}

}  // namespace instseg
