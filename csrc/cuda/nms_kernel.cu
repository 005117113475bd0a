// Non-maximum suppression on CUDA, kept on the device.
//
// 1. Sort (ATen, stable) by (category, score descending, index ascending);
//    boxes with a NaN score or a non-finite coordinate, or a score below
//    score_threshold, get the lowest key (-inf, tied with valid -inf scores)
//    and start out suppressed.
// 2. In chunks of rows sized so that the chunk's IoU bitmask stays under
//    kMaskBudget bytes: a mask kernel computes, for each row i of the chunk and
//    each block of 64 later boxes, the bits "IoU(i, j) > threshold and same
//    category"; then a single-block reduction walks the chunk's rows in order,
//    keeps each row not yet suppressed and ORs its mask into the suppressed
//    bitset. Nothing leaves the device inside the loop.
// 3. One device-to-host copy: the number kept. Batched results are then merged
//    by score (stable) on the device.
// Memory: the bitmask chunk (<= kMaskBudget = 256 MiB) plus O(N) buffers,
// whatever N is. Batched NMS never computes IoU across categories: a mask
// block whose category ranges do not meet is written as zeros without any IoU.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda_compat.h"
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <optional>

#include "../nms_checks.h"

namespace instseg {
namespace {

constexpr int kBlock = 64;                           // boxes per mask word
constexpr int64_t kMaskBudget = int64_t(256) << 20;  // bytes of IoU bitmask per chunk
constexpr int kReduceThreads = 512;

template <typename T>
__device__ __forceinline__ bool suppresses(const T* a, const T* b, T thr) {
  const T w = max(T(0), min(a[2], b[2]) - max(a[0], b[0]));
  const T h = max(T(0), min(a[3], b[3]) - max(a[1], b[1]));
  const T inter = w * h;
  const T area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const T area_b = (b[2] - b[0]) * (b[3] - b[1]);
  return inter / (area_a + area_b - inter) > thr;
}

// mask[(i - r0) * words + cb] bit t: box cb * 64 + t (> i, same category)
// is suppressed by box i. Grid: (column blocks, row blocks of the chunk).
template <typename T>
__global__ void mask_kernel(const T* __restrict__ boxes, const int64_t* __restrict__ cats,
                            int64_t n, int64_t r0, int64_t r1, int64_t words, T thr,
                            uint64_t* __restrict__ mask) {
  const int64_t rb = r0 / kBlock + blockIdx.y;  // row block (global)
  const int64_t cb = blockIdx.x;                // column block
  if (cb < rb) return;                          // below the diagonal: never read
  const int64_t row = rb * kBlock + threadIdx.x;
  const int64_t col0 = cb * kBlock;
  const int64_t ncols = min(int64_t(kBlock), n - col0);
  __shared__ T cbox[kBlock * 4];
  __shared__ int64_t ccat[kBlock];
  if (threadIdx.x < ncols) {
    for (int d = 0; d < 4; ++d) cbox[threadIdx.x * 4 + d] = boxes[(col0 + threadIdx.x) * 4 + d];
    ccat[threadIdx.x] = cats ? cats[col0 + threadIdx.x] : 0;
  }
  __syncthreads();
  if (row < r0 || row >= r1) return;
  uint64_t bits = 0;
  const int64_t cat = cats ? cats[row] : 0;
  // Sorted by category: blocks whose categories cannot meet need no IoU.
  if (!cats || (ccat[0] <= cat && cat <= ccat[ncols - 1])) {
    const T* a = boxes + row * 4;
    for (int t = 0; t < ncols; ++t) {
      const int64_t j = col0 + t;
      if (j > row && ccat[t] == cat && suppresses(a, cbox + t * 4, thr)) bits |= uint64_t(1) << t;
    }
  }
  mask[(row - r0) * words + cb] = bits;
}

// Marks the boxes that may never be kept (sorted last) as suppressed.
__global__ void init_removed_kernel(const bool* __restrict__ valid, int64_t n, int64_t words,
                                    uint64_t* __restrict__ removed) {
  for (int64_t w = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; w < words;
       w += int64_t(blockDim.x) * gridDim.x) {
    uint64_t bits = 0;
    for (int t = 0; t < kBlock; ++t) {
      const int64_t i = w * kBlock + t;
      if (i < n && !valid[i]) bits |= uint64_t(1) << t;
    }
    removed[w] = bits;
  }
}

// One block: walks rows [r0, r1) in order. state[0] = number kept so far.
__global__ void __launch_bounds__(kReduceThreads) reduce_kernel(
    const uint64_t* __restrict__ mask, const int64_t* __restrict__ cats, int64_t n, int64_t r0,
    int64_t r1, int64_t words, int64_t max_output, uint64_t* __restrict__ removed,
    int64_t* __restrict__ keep, int64_t* __restrict__ state) {
  __shared__ int64_t last_word;
  // Every thread counts the kept rows itself (the decisions are uniform across
  // the block), so no thread reads a count that thread 0 is updating.
  int64_t count = state[0];
  // Every thread holds the suppressed-bits word of the current row, reloaded
  // at word boundaries and after each kept row (whose OR may change it), so a
  // suppressed row costs a register test, no memory access and no sync.
  uint64_t cur = removed[r0 / kBlock];
  for (int64_t i = r0; i < r1; ++i) {
    if (i % kBlock == 0) cur = removed[i / kBlock];
    if (max_output >= 0 && count >= max_output) break;
    if ((cur >> (i % kBlock)) & 1) continue;  // uniform across the block
    if (threadIdx.x == 0) {
      keep[count] = i;
      // Words past the end of row i's category hold no bits: stop there.
      int64_t end = n;
      if (cats) {
        int64_t lo = i, hi = n;  // first position with a different category
        while (lo + 1 < hi) {
          const int64_t mid = (lo + hi) / 2;
          if (cats[mid] == cats[i]) lo = mid; else hi = mid;
        }
        end = hi;
      }
      last_word = (end - 1) / kBlock;
    }
    ++count;
    __syncthreads();
    const uint64_t* row = mask + (i - r0) * words;
    for (int64_t w = i / kBlock + threadIdx.x; w <= last_word; w += blockDim.x) removed[w] |= row[w];
    __syncthreads();
    cur = removed[i / kBlock];
  }
  // Every thread has read state[0] before thread 0 overwrites it (a chunk that
  // keeps no box runs no other barrier).
  __syncthreads();
  if (threadIdx.x == 0) state[0] = count;
}

template <typename T>
at::Tensor nms_cuda_impl(const at::Tensor& boxes, const at::Tensor& scores,
                         const std::optional<at::Tensor>& idxs, double iou_threshold,
                         int64_t max_output, std::optional<double> score_threshold) {
  const int64_t n = boxes.size(0);
  const auto long_opts = boxes.options().dtype(at::kLong);
  // 1. Sort keys. Invalid boxes get the key -inf and, batched, the largest category.
  // NaN scores and non-finite boxes are invalid; +-inf scores are valid (as in torchvision):
  // a valid -inf box ties with the invalid ones in this sort, which is stable, so valid
  // boxes keep their index order and the invalid ones start out suppressed.
  at::Tensor valid = scores.isnan().logical_not().logical_and(boxes.isfinite().all(1));
  if (score_threshold) valid = valid.logical_and(scores.ge(threshold_above<T>(*score_threshold)));
  const at::Tensor key = scores.where(valid, -std::numeric_limits<double>::infinity());
  at::Tensor perm = std::get<1>(key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
  at::Tensor cats_sorted;
  if (idxs) {
    const at::Tensor cat_key =
        idxs->to(at::kLong).where(valid, std::numeric_limits<int64_t>::max()).index_select(0, perm);
    const at::Tensor p2 = std::get<1>(cat_key.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    perm = perm.index_select(0, p2);
    cats_sorted = cat_key.index_select(0, p2).contiguous();
  }
  const at::Tensor sboxes = boxes.index_select(0, perm).contiguous();
  const at::Tensor svalid = valid.index_select(0, perm).contiguous();

  // 2. Chunked bitmask + device reduction.
  const int64_t words = (n + kBlock - 1) / kBlock;
  const int64_t budget = cuda_compat::budget("INSTSEG_NMS_MASK_BUDGET", kMaskBudget);
  int64_t rows = std::max<int64_t>(kBlock, (budget / (words * 8)) / kBlock * kBlock);
  rows = std::min<int64_t>({rows, words * kBlock, int64_t(65535) * kBlock});
  at::Tensor mask = at::empty({rows * words}, long_opts);
  at::Tensor removed = at::empty({words}, long_opts);
  at::Tensor keep = at::empty({n}, long_opts);
  at::Tensor state = at::zeros({1}, long_opts);
  const cudaStream_t stream = cuda_compat::current_stream();
  auto* removed_p = reinterpret_cast<uint64_t*>(removed.data_ptr<int64_t>());
  auto* mask_p = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  const int64_t* cats_p = idxs ? cats_sorted.data_ptr<int64_t>() : nullptr;
  INSTSEG_LAUNCH(init_removed_kernel, static_cast<unsigned int>(std::min<int64_t>((words + 255) / 256, 65535)),
                 256, 0, stream, svalid.data_ptr<bool>(), n, words, removed_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t limit = idxs ? -1 : max_output;  // batched: the limit applies after the merge
  for (int64_t r0 = 0; r0 < n; r0 += rows) {
    const int64_t r1 = std::min(n, r0 + rows);
    const dim3 grid(static_cast<unsigned int>(words),
                    static_cast<unsigned int>((r1 - r0 + kBlock - 1) / kBlock));
    INSTSEG_LAUNCH(mask_kernel<T>, grid, kBlock, 0, stream, sboxes.data_ptr<T>(), cats_p, n, r0, r1, words,
                   threshold_below<T>(iou_threshold), mask_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSTSEG_LAUNCH(reduce_kernel, 1, kReduceThreads, 0, stream, mask_p, cats_p, n, r0, r1, words, limit,
                                                    removed_p, keep.data_ptr<int64_t>(),
                                                    state.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  // 3. The one synchronisation: how many were kept.
  const int64_t count = state.cpu().data_ptr<int64_t>()[0];
  at::Tensor kept = perm.index_select(0, keep.narrow(0, 0, count));
  if (idxs) {
    // Merge categories: score descending, ties by lower index.
    kept = std::get<0>(kept.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
    const at::Tensor order =
        std::get<1>(scores.index_select(0, kept).sort(/*stable=*/true, /*dim=*/0, /*descending=*/true));
    kept = kept.index_select(0, order);
    if (max_output >= 0 && kept.size(0) > max_output) kept = kept.narrow(0, 0, max_output);
  }
  return kept.contiguous();
}

at::Tensor nms_cuda(const at::Tensor& boxes_, const at::Tensor& scores_,
                    const std::optional<at::Tensor>& idxs, double iou_threshold,
                    int64_t max_output, std::optional<double> score_threshold) {
  check_nms_args(boxes_, scores_, idxs, iou_threshold);
  TORCH_CHECK(cuda_compat::on_kernel_device(boxes_), "nms: CUDA kernel got ", boxes_.device(), " boxes");
  cuda_compat::DeviceGuard guard(boxes_.device());
  if (boxes_.size(0) == 0 || max_output == 0) {
    return at::empty({0}, boxes_.options().dtype(at::kLong));
  }
  // IoU in float32 (float64 for float64 boxes).
  const at::ScalarType acc = acc_dtype(boxes_.scalar_type());
  const at::Tensor boxes = boxes_.to(acc).contiguous();
  const at::Tensor scores = scores_.to(acc).contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(acc, "nms_cuda", [&] {
    out = nms_cuda_impl<scalar_t>(boxes, scores, idxs, iou_threshold, max_output, score_threshold);
  });
  return out;
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("nms", TORCH_FN(nms_cuda));
}

}  // namespace instseg
