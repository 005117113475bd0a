// The binary-mask ops on CUDA.
//
// masks_to_boxes, stability_score_and_boxes: one block per mask; each thread walks the mask's
// pixels with a block-sized stride, keeps its own box (and, for logits, its two threshold
// counts), and a shared-memory tree reduction combines the block's threads.
//
// masks_to_rle, over the pixels of all masks in column-major order (q = x * H + y within a
// mask), four steps:
//   1. flag the run starts: q > 0 with a value different from q - 1's, and q = 0 when the
//      first pixel is set (the leading run of zeros is then empty);
//   2. an ATen cumsum per mask gives each start its rank r (1..K_n); mask n has K_n + 1 runs
//      (none when H * W == 0), and a cumsum over the masks gives the offsets. One
//      device-to-host copy: the total number of runs, to allocate the counts;
//   3. every start writes its position to ends[offset_n + r - 1] (it ends run r - 1) and the
//      last pixel of each mask writes H * W to ends[offset_n + K_n];
//   4. run j of mask n: ends[j] minus the end of run j - 1 (0 for the first run).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include "cuda_compat.h"
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../masks_checks.h"

namespace instseg {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kEmptyMin = 0x7fffffffffffffffLL;

// Per-thread accumulator: box (x1, y1 minima; x2, y2 maxima, -1 while empty) and counts.
struct BoxStats {
  int64_t v[6];  // x1, y1, x2, y2, above the upper threshold, above the lower threshold
};

__device__ __forceinline__ void add_pixel(BoxStats& s, int64_t x, int64_t y) {
  s.v[0] = x < s.v[0] ? x : s.v[0];
  s.v[1] = y < s.v[1] ? y : s.v[1];
  s.v[2] = x > s.v[2] ? x : s.v[2];
  s.v[3] = y > s.v[3] ? y : s.v[3];
}

// Combines the block's accumulators into thread 0's; every thread must call it.
__device__ void block_reduce(BoxStats& s) {
  __shared__ int64_t red[6][kThreads];
  const int t = threadIdx.x;
  for (int k = 0; k < 6; ++k) red[k][t] = s.v[k];
  __syncthreads();
  for (int half = kThreads / 2; half > 0; half /= 2) {
    if (t < half) {
      const int o = t + half;
      red[0][t] = red[0][o] < red[0][t] ? red[0][o] : red[0][t];
      red[1][t] = red[1][o] < red[1][t] ? red[1][o] : red[1][t];
      red[2][t] = red[2][o] > red[2][t] ? red[2][o] : red[2][t];
      red[3][t] = red[3][o] > red[3][t] ? red[3][o] : red[3][t];
      red[4][t] += red[4][o];
      red[5][t] += red[5][o];
    }
    __syncthreads();
  }
  for (int k = 0; k < 6; ++k) s.v[k] = red[k][0];
}

__device__ __forceinline__ void store_box(const BoxStats& s, int64_t* out) {
  const bool empty = s.v[2] < 0;
  out[0] = empty ? 0 : s.v[0];
  out[1] = empty ? 0 : s.v[1];
  out[2] = empty ? 0 : s.v[2];
  out[3] = empty ? 0 : s.v[3];
}

// grid: one block per mask; blockDim.x == kThreads.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    boxes_kernel(const T* __restrict__ masks, int64_t h, int64_t w, int64_t* __restrict__ boxes) {
  const int64_t hw = h * w;
  const T* m = masks + static_cast<int64_t>(blockIdx.x) * hw;
  BoxStats s{{kEmptyMin, kEmptyMin, -1, -1, 0, 0}};
  for (int64_t p = threadIdx.x; p < hw; p += kThreads)
    if (m[p] != T(0)) add_pixel(s, p % w, p / w);
  block_reduce(s);
  if (threadIdx.x == 0) store_box(s, boxes + 4 * static_cast<int64_t>(blockIdx.x));
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    scores_kernel(const T* __restrict__ logits, int64_t h, int64_t w, T mid, T hi, T lo,
                  float* __restrict__ scores, int64_t* __restrict__ boxes) {
  using acc_t = at::opmath_type<T>;
  const acc_t a_mid = mid, a_hi = hi, a_lo = lo;
  const int64_t hw = h * w;
  const T* m = logits + static_cast<int64_t>(blockIdx.x) * hw;
  BoxStats s{{kEmptyMin, kEmptyMin, -1, -1, 0, 0}};
  for (int64_t p = threadIdx.x; p < hw; p += kThreads) {
    const acc_t v = static_cast<acc_t>(m[p]);
    s.v[4] += v > a_hi;
    s.v[5] += v > a_lo;
    if (v > a_mid) add_pixel(s, p % w, p / w);
  }
  block_reduce(s);
  if (threadIdx.x == 0) {
    // int32 / int32 true division in torch: both converted to float32
    scores[blockIdx.x] = static_cast<float>(s.v[4]) / static_cast<float>(s.v[5]);
    store_box(s, boxes + 4 * static_cast<int64_t>(blockIdx.x));
  }
}

// The value at column-major position q of a mask (row-major storage).
template <typename T>
__device__ __forceinline__ bool at_colmajor(const T* m, int64_t q, int64_t h, int64_t w) {
  return m[(q % h) * w + q / h] != T(0);
}

template <typename T>
__global__ void rle_flag_kernel(const T* __restrict__ masks, int64_t total, int64_t h, int64_t w,
                                uint8_t* __restrict__ starts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t hw = h * w;
  const int64_t q = i % hw;
  const T* m = masks + (i - q);
  const bool v = at_colmajor(m, q, h, w);
  starts[i] = (q == 0 ? v : v != at_colmajor(m, q - 1, h, w)) ? 1 : 0;
}

// rank: inclusive cumsum of starts per mask; offsets: Tensor[N + 1].
__global__ void rle_ends_kernel(const uint8_t* __restrict__ starts, const int32_t* __restrict__ rank,
                                const int64_t* __restrict__ offsets, int64_t total, int64_t hw,
                                int64_t* __restrict__ ends) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t q = i % hw;
  const int64_t off = offsets[i / hw];
  const int32_t r = rank[i];
  if (starts[i]) ends[off + r - 1] = q;
  if (q == hw - 1) ends[off + r] = hw;
}

__global__ void rle_counts_kernel(const uint8_t* __restrict__ starts, const int32_t* __restrict__ rank,
                                  const int64_t* __restrict__ offsets, const int64_t* __restrict__ ends,
                                  int64_t total, int64_t hw, int64_t* __restrict__ counts) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int64_t q = i % hw;
  const int64_t off = offsets[i / hw];
  const int32_t r = rank[i];
  if (starts[i]) counts[off + r - 1] = q - (r == 1 ? 0 : ends[off + r - 2]);
  if (q == hw - 1) counts[off + r] = hw - (r == 0 ? 0 : ends[off + r - 1]);
}

at::Tensor masks_to_boxes_cuda(const at::Tensor& masks) {
  check_binary_masks(masks, "masks_to_boxes");
  TORCH_CHECK(cuda_compat::on_kernel_device(masks), "masks_to_boxes: CUDA kernel got ", masks.device(), " masks");
  const cuda_compat::DeviceGuard guard(masks.device());
  const int64_t n = masks.size(0), h = masks.size(1), w = masks.size(2);
  TORCH_CHECK(n <= 0x7fffffff, "masks_to_boxes: at most 2^31 - 1 masks, got ", n);
  at::Tensor boxes = at::empty({n, 4}, masks.options().dtype(at::kLong));
  if (n == 0) return boxes;
  const at::Tensor m = masks.contiguous();
  const cudaStream_t stream = cuda_compat::current_stream();
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, m.scalar_type(), "masks_to_boxes_cuda", [&] {
    INSTSEG_LAUNCH((boxes_kernel<scalar_t>), dim3(static_cast<unsigned int>(n)), kThreads, 0, stream,
                   m.const_data_ptr<scalar_t>(), h, w, boxes.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return boxes;
}

std::tuple<at::Tensor, at::Tensor> stability_score_and_boxes_cuda(const at::Tensor& logits, double mask_threshold,
                                                                  double offset) {
  check_mask_logits(logits, mask_threshold, offset);
  TORCH_CHECK(cuda_compat::on_kernel_device(logits), "stability_score_and_boxes: CUDA kernel got ",
              logits.device(), " logits");
  const cuda_compat::DeviceGuard guard(logits.device());
  const int64_t n = logits.size(0), h = logits.size(1), w = logits.size(2);
  TORCH_CHECK(n <= 0x7fffffff, "stability_score_and_boxes: at most 2^31 - 1 masks, got ", n);
  at::Tensor scores = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor boxes = at::empty({n, 4}, logits.options().dtype(at::kLong));
  if (n == 0) return {scores, boxes};
  const at::Tensor l = logits.contiguous();
  const cudaStream_t stream = cuda_compat::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "stability_score_and_boxes_cuda", [&] {
    INSTSEG_LAUNCH((scores_kernel<scalar_t>), dim3(static_cast<unsigned int>(n)), kThreads, 0, stream,
                   l.const_data_ptr<scalar_t>(), h, w, static_cast<scalar_t>(mask_threshold),
                   static_cast<scalar_t>(mask_threshold + offset), static_cast<scalar_t>(mask_threshold - offset),
                   scores.data_ptr<float>(), boxes.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {scores, boxes};
}

std::tuple<at::Tensor, at::Tensor> masks_to_rle_cuda(const at::Tensor& masks) {
  check_binary_masks(masks, "masks_to_rle");
  TORCH_CHECK(cuda_compat::on_kernel_device(masks), "masks_to_rle: CUDA kernel got ", masks.device(), " masks");
  const cuda_compat::DeviceGuard guard(masks.device());
  const int64_t n = masks.size(0), h = masks.size(1), w = masks.size(2);
  const int64_t hw = h * w, total = n * hw;
  const auto long_opts = masks.options().dtype(at::kLong);
  if (total == 0) return {at::empty({0}, long_opts), at::zeros({n + 1}, long_opts)};
  const at::Tensor m = masks.contiguous();
  at::Tensor starts = at::empty({n, hw}, masks.options().dtype(at::kByte));
  const cudaStream_t stream = cuda_compat::current_stream();
  const dim3 grid(static_cast<unsigned int>((total + kThreads - 1) / kThreads));
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, m.scalar_type(), "masks_to_rle_cuda", [&] {
    INSTSEG_LAUNCH((rle_flag_kernel<scalar_t>), grid, kThreads, 0, stream, m.const_data_ptr<scalar_t>(), total, h, w,
                   starts.data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const at::Tensor rank = at::cumsum(starts, 1, at::kInt).contiguous();
  // mask n has K_n + 1 runs; offsets[n + 1] = sum of the runs of masks 0..n
  at::Tensor offsets = at::zeros({n + 1}, long_opts);
  offsets.narrow(0, 1, n).copy_(at::cumsum(rank.select(1, hw - 1).to(at::kLong).add(1), 0));
  const int64_t c = offsets[n].item<int64_t>();
  at::Tensor ends = at::empty({c}, long_opts);
  at::Tensor counts = at::empty({c}, long_opts);
  INSTSEG_LAUNCH(rle_ends_kernel, grid, kThreads, 0, stream, starts.const_data_ptr<uint8_t>(),
                 rank.const_data_ptr<int32_t>(), offsets.const_data_ptr<int64_t>(), total, hw,
                 ends.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  INSTSEG_LAUNCH(rle_counts_kernel, grid, kThreads, 0, stream, starts.const_data_ptr<uint8_t>(),
                 rank.const_data_ptr<int32_t>(), offsets.const_data_ptr<int64_t>(), ends.const_data_ptr<int64_t>(),
                 total, hw, counts.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {counts, offsets};
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("masks_to_boxes", TORCH_FN(masks_to_boxes_cuda));
  m.impl("masks_to_rle", TORCH_FN(masks_to_rle_cuda));
  m.impl("stability_score_and_boxes", TORCH_FN(stability_score_and_boxes_cuda));
}

}  // namespace instseg
