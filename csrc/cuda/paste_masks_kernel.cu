// Mask pasting on CUDA, for all masks at once and without host round trips
// (the canvas form never synchronises; the crop form copies one number, the
// total crop size, to size its output).
//
// 1. region_kernel (one thread per mask): the mask's geometry (see
//    paste_masks_common.h) and the area of its clipped region.
// 2. at::cumsum of the areas: where each mask's pixels start in the flat list
//    of all region pixels.
// 3. paste_kernel: a grid-stride loop over that flat list; each thread finds
//    its mask by binary search over the prefix sums and writes one pixel.
// Work is proportional to the total clipped area, plus a memset of the
// canvases in the canvas form. The geometry and the pixel expression are the
// CPU kernel's, so both give identical values.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda_compat.h"
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "../paste_masks_checks.h"
#include "../paste_masks_common.h"

namespace instseg {
namespace {

using namespace paste_detail;

constexpr int kThreads = 256;

// Per-mask geometry of either mode, computed once by region_kernel.
struct Geometry {
  Region region;
  int64_t bx, by;         // torchvision: integer box origin
  float sx, sy;           // torchvision: resize scales
  float x0, y0, x1, y1;   // aligned: the sub-pixel box
};

__global__ void region_kernel(const float* __restrict__ boxes, int64_t N, int64_t M, int64_t pad,
                              int64_t H, int64_t W, bool aligned, Geometry* __restrict__ geom,
                              int64_t* __restrict__ areas, int64_t* __restrict__ regions) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const float* box = boxes + 4 * n;
  Geometry g{};
  if (aligned) {
    const AlignedPaste a = aligned_geometry(box, M, H, W);
    g.region = a.region;
    g.x0 = a.x0;
    g.y0 = a.y0;
    g.x1 = a.x1;
    g.y1 = a.y1;
  } else {
    const TvPaste t = tv_geometry(box, M, pad, H, W);
    g.region = t.region;
    g.bx = t.bx;
    g.by = t.by;
    g.sx = t.sx;
    g.sy = t.sy;
  }
  if (g.region.empty()) g.region = Region{0, 0, 0, 0};
  geom[n] = g;
  areas[n] = g.region.area();
  if (regions != nullptr) {
    regions[4 * n] = g.region.x0;
    regions[4 * n + 1] = g.region.y0;
    regions[4 * n + 2] = g.region.x1;
    regions[4 * n + 3] = g.region.y1;
  }
}

// `ends`: inclusive prefix sums of the areas. Canvas form: out is N x H x W and
// pixel (y, x) of mask n goes to out[n, y, x]; crop form (crops=true): the
// flat index itself is the output position.
template <typename scalar_t, typename out_t>
__global__ void paste_kernel(const scalar_t* __restrict__ masks, const Geometry* __restrict__ geom,
                             const int64_t* __restrict__ ends, int64_t N, int64_t M, int64_t pad,
                             int64_t H, int64_t W, bool aligned, bool crops, float threshold,
                             out_t* __restrict__ out) {
  const int64_t total = ends[N - 1];
  const int64_t P = M + 2 * pad;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t lo = 0, hi = N - 1;  // first n with ends[n] > idx
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ends[mid] > idx) hi = mid;
      else lo = mid + 1;
    }
    const int64_t n = lo;
    const Geometry& g = geom[n];
    const int64_t w = g.region.x1 - g.region.x0;
    const int64_t local = idx - (ends[n] - g.region.area());
    const int64_t y = g.region.y0 + local / w, x = g.region.x0 + local % w;
    Tap ty, tx;
    if (aligned) {
      ty = aligned_tap(y, g.y0, g.y1, M);
      tx = aligned_tap(x, g.x0, g.x1, M);
    } else {
      ty = tv_tap(g.sy, y - g.by, P);
      tx = tv_tap(g.sx, x - g.bx, P);
    }
    const float v = pixel_value(masks + n * M * M, M, aligned ? 0 : pad, ty, tx);
    const int64_t pos = crops ? idx : (n * H + y) * W + x;
    if constexpr (std::is_same<out_t, bool>::value) {
      out[pos] = v >= threshold;
    } else {
      out[pos] = static_cast<out_t>(v);
    }
  }
}

int grid_blocks(int64_t work) {
  const int sms = cuda_compat::multiprocessor_count();
  const int64_t wanted = (work + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(wanted, int64_t(sms) * 32)));
}

struct Prepared {
  at::Tensor masks, geom, ends, regions;
};

// Runs region_kernel and the prefix sum; `regions` is filled for the crop form.
Prepared prepare(const at::Tensor& masks_, const at::Tensor& boxes_, int64_t H, int64_t W,
                 int64_t pad, bool aligned, bool want_regions, cudaStream_t stream) {
  Prepared p;
  p.masks = masks_.contiguous();
  const at::Tensor boxes = boxes_.to(at::kFloat).contiguous();
  const int64_t N = p.masks.size(0), M = p.masks.size(1);
  const auto opts = p.masks.options();
  p.geom = at::empty({N * static_cast<int64_t>(sizeof(Geometry))}, opts.dtype(at::kByte));
  at::Tensor areas = at::empty({N}, opts.dtype(at::kLong));
  p.regions = at::empty({N, 4}, opts.dtype(at::kLong));
  if (N > 0) {
    INSTSEG_LAUNCH(region_kernel, static_cast<unsigned>((N + kThreads - 1) / kThreads), kThreads, 0, stream,
        boxes.const_data_ptr<float>(), N, M, pad, H, W, aligned,
        reinterpret_cast<Geometry*>(p.geom.mutable_data_ptr()), areas.mutable_data_ptr<int64_t>(),
        want_regions ? p.regions.mutable_data_ptr<int64_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  p.ends = at::cumsum(areas, 0);
  return p;
}

template <typename out_t, typename scalar_t>
void launch_paste(const Prepared& p, int64_t H, int64_t W, int64_t pad, bool aligned, bool crops,
                  std::optional<double> threshold, int64_t work, out_t* out, cudaStream_t stream) {
  const int64_t N = p.masks.size(0), M = p.masks.size(1);
  INSTSEG_LAUNCH((paste_kernel<scalar_t, out_t>), grid_blocks(work), kThreads, 0, stream,
      p.masks.const_data_ptr<scalar_t>(), reinterpret_cast<const Geometry*>(p.geom.const_data_ptr()),
      p.ends.const_data_ptr<int64_t>(), N, M, pad, H, W, aligned, crops,
      threshold ? threshold_as_float(*threshold) : 0.f, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor paste_masks_cuda(const at::Tensor& masks, const at::Tensor& boxes, int64_t H, int64_t W,
                            int64_t padding, std::optional<double> threshold, bool aligned) {
  check_paste_args(masks, boxes, H, W, padding, threshold);
  TORCH_CHECK(cuda_compat::on_kernel_device(masks), "paste_masks: CUDA kernel got ", masks.device(), " masks");
  cuda_compat::DeviceGuard guard(masks.device());
  const cudaStream_t stream = cuda_compat::current_stream();
  const int64_t N = masks.size(0);
  const int64_t pad = aligned ? 0 : padding;
  at::Tensor out = at::zeros({N, H, W}, masks.options().dtype(threshold ? at::kBool : masks.scalar_type()));
  if (threshold && threshold_as_float(*threshold) <= 0.f) out.fill_(true);  // unreached pixels: 0 >= threshold
  if (out.numel() == 0) return out;
  const Prepared p = prepare(masks, boxes, H, W, pad, aligned, false, stream);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.masks.scalar_type(), "paste_masks_cuda", [&] {
    if (threshold) {
      launch_paste<bool, scalar_t>(p, H, W, pad, aligned, false, threshold, out.numel(),
                                   out.mutable_data_ptr<bool>(), stream);
    } else {
      launch_paste<scalar_t, scalar_t>(p, H, W, pad, aligned, false, threshold, out.numel(),
                                       out.mutable_data_ptr<scalar_t>(), stream);
    }
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> paste_masks_crops_cuda(
    const at::Tensor& masks, const at::Tensor& boxes, int64_t H, int64_t W, int64_t padding,
    std::optional<double> threshold, bool aligned) {
  check_paste_args(masks, boxes, H, W, padding, threshold);
  TORCH_CHECK(cuda_compat::on_kernel_device(masks), "paste_masks_crops: CUDA kernel got ", masks.device(), " masks");
  cuda_compat::DeviceGuard guard(masks.device());
  const cudaStream_t stream = cuda_compat::current_stream();
  const int64_t N = masks.size(0);
  const int64_t pad = aligned ? 0 : padding;
  const Prepared p = prepare(masks, boxes, H, W, pad, aligned, true, stream);
  const auto opts = p.masks.options();
  at::Tensor offsets = at::zeros({N + 1}, opts.dtype(at::kLong));
  const auto out_dtype = threshold ? at::kBool : p.masks.scalar_type();
  if (N == 0) return {at::empty({0}, opts.dtype(out_dtype)), p.regions, offsets};
  offsets.narrow(0, 1, N).copy_(p.ends);
  const int64_t total = p.ends[N - 1].item<int64_t>();  // the one synchronisation
  at::Tensor data = at::empty({total}, opts.dtype(out_dtype));
  if (total == 0) return {data, p.regions, offsets};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.masks.scalar_type(), "paste_masks_crops_cuda", [&] {
    if (threshold) {
      launch_paste<bool, scalar_t>(p, H, W, pad, aligned, true, threshold, total,
                                   data.mutable_data_ptr<bool>(), stream);
    } else {
      launch_paste<scalar_t, scalar_t>(p, H, W, pad, aligned, true, threshold, total,
                                       data.mutable_data_ptr<scalar_t>(), stream);
    }
  });
  return {data, p.regions, offsets};
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("paste_masks", TORCH_FN(paste_masks_cuda));
  m.impl("paste_masks_crops", TORCH_FN(paste_masks_crops_cuda));
}

}  // namespace instseg
