// Connected components on CUDA: union-find by atomicMin, iterated to convergence.
//
// parent[p] = p for every foreground pixel (-1 for background), then rounds of
//   hook:     every foreground pixel p, for each foreground neighbour q, finds the roots
//             a, b of p and q; if they differ, atomicMin(&parent[max(a, b)], min(a, b)) and
//             a flag is raised;
//   compress: parent[p] = root of p;
// until a round raises no flag. parent[x] only decreases and always points into x's
// component, so the component's smallest index (its first pixel in raster order) is its
// root at the end. A hook can be lost when two threads lower the same root at once; the
// flag then brings another round, which finds the roots still apart.
// Numbering: the roots are flagged, an ATen cumsum over each mask gives their rank (the
// label, in raster order), a last kernel writes every pixel's label and counts the areas
// with atomicAdd. One device-to-host copy per round (the flag) and one for K.
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include "cuda_compat.h"
#include <torch/library.h>

#include <cstdint>
#include <tuple>

#include "../connected_components_checks.h"

namespace instseg {
namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int32_t root_of(const int32_t* parent, int32_t x) {
  int32_t p = parent[x];
  while (p != x) {
    x = p;
    p = parent[x];
  }
  return x;
}

__global__ void init_kernel(const uint8_t* __restrict__ fg, int64_t total, int64_t hw, int32_t* __restrict__ parent) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  parent[i] = fg[i] ? static_cast<int32_t>(i % hw) : -1;
}

// parent holds indices within each mask; `base` offsets a pixel to its mask.
__global__ void hook_kernel(const uint8_t* __restrict__ fg, int64_t total, int64_t h, int64_t w, bool eight,
                            int32_t* parent, int32_t* changed) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total || !fg[i]) return;
  const int64_t hw = h * w;
  const int64_t base = (i / hw) * hw;
  int32_t* par = parent + base;
  const int32_t p = static_cast<int32_t>(i - base);
  const int64_t y = p / w, x = p % w;
  // the neighbours before p in raster order (the others see p from their side)
  const int dy[4] = {0, -1, -1, -1};
  const int dx[4] = {-1, 0, -1, 1};
  const int count = eight ? 4 : 2;
  for (int k = 0; k < count; ++k) {
    const int64_t ny = y + dy[k], nx = x + dx[k];
    if (ny < 0 || nx < 0 || nx >= w) continue;
    const int32_t q = static_cast<int32_t>(ny * w + nx);
    if (!fg[base + q]) continue;
    const int32_t a = root_of(par, p), b = root_of(par, q);
    if (a != b) {
      atomicMin(par + (a > b ? a : b), a < b ? a : b);
      *changed = 1;
    }
  }
}

__global__ void compress_kernel(const uint8_t* __restrict__ fg, int64_t total, int64_t hw, int32_t* parent,
                                int32_t* __restrict__ is_root) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  if (!fg[i]) {
    is_root[i] = 0;
    return;
  }
  const int64_t base = (i / hw) * hw;
  const int32_t r = root_of(parent + base, static_cast<int32_t>(i - base));
  parent[i] = r;
  is_root[i] = r == static_cast<int32_t>(i - base) ? 1 : 0;
}

__global__ void label_kernel(const uint8_t* __restrict__ fg, const int32_t* __restrict__ parent,
                             const int32_t* __restrict__ rank, int64_t total, int64_t hw, int64_t k,
                             int32_t* __restrict__ labels, int64_t* __restrict__ areas) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= total) return;
  if (!fg[i]) {
    labels[i] = 0;
    return;
  }
  const int64_t m = i / hw;
  const int32_t label = rank[m * hw + parent[i]];  // inclusive count of roots up to the root
  labels[i] = label;
  atomicAdd(reinterpret_cast<unsigned long long*>(areas + m * k + (label - 1)), 1ull);
}

std::tuple<at::Tensor, at::Tensor> connected_components_cuda(const at::Tensor& masks, int64_t connectivity) {
  check_connected_components_args(masks, connectivity);
  TORCH_CHECK(cuda_compat::on_kernel_device(masks), "connected_components: CUDA kernel got ", masks.device(),
              " masks");
  const cuda_compat::DeviceGuard guard(masks.device());
  const int64_t n = masks.size(0), h = masks.size(1), w = masks.size(2);
  const int64_t hw = h * w, total = n * hw;
  at::Tensor labels = at::empty({n, h, w}, masks.options().dtype(at::kInt));
  if (total == 0) return {labels, at::zeros({n, 0}, masks.options().dtype(at::kLong))};
  const at::Tensor fg = masks.ne(0).to(at::kByte).contiguous();
  at::Tensor parent = at::empty({total}, masks.options().dtype(at::kInt));
  at::Tensor is_root = at::empty({n, hw}, masks.options().dtype(at::kInt));
  at::Tensor changed = at::zeros({1}, masks.options().dtype(at::kInt));
  const cudaStream_t stream = cuda_compat::current_stream();
  const dim3 grid(static_cast<unsigned int>((total + kThreads - 1) / kThreads));
  const uint8_t* fg_p = fg.data_ptr<uint8_t>();
  int32_t* par_p = parent.data_ptr<int32_t>();
  INSTSEG_LAUNCH(init_kernel, grid, kThreads, 0, stream, fg_p, total, hw, par_p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  while (true) {
    changed.zero_();
    INSTSEG_LAUNCH(hook_kernel, grid, kThreads, 0, stream, fg_p, total, h, w, connectivity == 8, par_p,
                   changed.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    INSTSEG_LAUNCH(compress_kernel, grid, kThreads, 0, stream, fg_p, total, hw, par_p,
                   is_root.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (changed.item<int32_t>() == 0) break;
  }
  const at::Tensor rank = at::cumsum(is_root, 1, at::kInt).contiguous();
  const int64_t k = n > 0 ? rank.select(1, hw - 1).max().item<int32_t>() : 0;
  at::Tensor areas = at::zeros({n, k}, masks.options().dtype(at::kLong));
  INSTSEG_LAUNCH(label_kernel, grid, kThreads, 0, stream, fg_p, par_p, rank.data_ptr<int32_t>(), total, hw, k,
                 labels.data_ptr<int32_t>(), areas.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {labels, areas};
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("connected_components", TORCH_FN(connected_components_cuda));
}

}  // namespace instseg
