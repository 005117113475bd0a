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
#include <ATen/ops/cat.h>
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
#include <type_traits>

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

// ------------------------------------------------------------------- backward
// One thread per mask cell (grid-stride): the cell gathers the terms of the
// region pixels whose taps reach it (paste_masks_common.h), in the CPU kernel's
// order, so both give the same bits, without atomics (deterministic). The
// pixels reaching padded row r have y keys in {r - 1, r}: one run of rows,
// found by binary search (likewise for columns). Work per cell is the number
// of (row, column) pixel pairs of its runs, about 4 x region area / M^2 for a
// box wider than the mask; a box far larger than the image (all pixels on a few
// cells) puts the whole region on those cells' threads.
// Canvas form: grad is N x H x W; crop form (offsets != nullptr): mask n's
// region starts at grad[offsets[n]], rows x1 - x0 apart.
template <typename scalar_t>
__global__ void paste_backward_kernel(const scalar_t* __restrict__ grad, const Geometry* __restrict__ geom,
                                      const int64_t* __restrict__ offsets, int64_t N, int64_t M, int64_t pad,
                                      int64_t H, int64_t W, bool aligned, scalar_t* __restrict__ out) {
  using acc_t = typename std::conditional<std::is_same<scalar_t, double>::value, double, float>::type;
  const int64_t total = N * M * M;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t n = idx / (M * M), r = (idx / M) % M + pad, c = idx % M + pad;  // padded cell
    const Geometry& g = geom[n];
    const Region& reg = g.region;
    acc_t acc = 0;
    if (!reg.empty()) {
      const PasteAxis ay = aligned ? aligned_axis(g.y0, g.y1, M) : tv_axis(g.sy, g.by, M, pad);
      const PasteAxis ax = aligned ? aligned_axis(g.x0, g.x1, M) : tv_axis(g.sx, g.bx, M, pad);
      const int64_t ya = first_pixel(ay, reg.y0, reg.y1, r - 1), yb = first_pixel(ay, ya, reg.y1, r + 1);
      const int64_t xa = first_pixel(ax, reg.x0, reg.x1, c - 1), xb = first_pixel(ax, xa, reg.x1, c + 1);
      const int64_t stride = offsets != nullptr ? reg.x1 - reg.x0 : W;
      const scalar_t* base = grad + (offsets != nullptr ? offsets[n] : (n * H + reg.y0) * W + reg.x0);
      for (int64_t y = ya; y < yb; ++y) {
        const Tap ty = ay.tap(y);
        if (!ty.valid || (ty.i0 != r && ty.i1 != r)) continue;
        const scalar_t* row = base + (y - reg.y0) * stride;
        acc_t s = 0;
        for (int64_t x = xa; x < xb; ++x) {
          const Tap tx = ax.tap(x);
          if (tx.valid) s = add_tap_terms(s, tx, c, static_cast<acc_t>(row[x - reg.x0]));
        }
        acc = add_tap_terms(acc, ty, r, s);
      }
    }
    out[idx] = static_cast<scalar_t>(acc);
  }
}

void check_backward_grad(const at::Tensor& grad, const at::Tensor& masks, const char* name) {
  TORCH_CHECK(grad.scalar_type() == masks.scalar_type(), name, ": the gradient is ", grad.scalar_type(),
              " but the masks are ", masks.scalar_type());
  TORCH_CHECK(grad.device() == masks.device(), name, ": the gradient is on ", grad.device(),
              " but the masks are on ", masks.device());
}

at::Tensor launch_paste_backward(const Prepared& p, const at::Tensor& grad, const int64_t* offsets, int64_t H,
                                 int64_t W, int64_t pad, bool aligned, cudaStream_t stream) {
  const int64_t N = p.masks.size(0), M = p.masks.size(1);
  at::Tensor out = at::empty({N, M, M}, p.masks.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, p.masks.scalar_type(), "paste_masks_backward_cuda", [&] {
    INSTSEG_LAUNCH(paste_backward_kernel<scalar_t>, grid_blocks(out.numel()), kThreads, 0, stream,
        grad.const_data_ptr<scalar_t>(), reinterpret_cast<const Geometry*>(p.geom.const_data_ptr()), offsets,
        N, M, pad, H, W, aligned, out.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor paste_masks_backward_cuda(const at::Tensor& grad_, const at::Tensor& masks, const at::Tensor& boxes,
                                     int64_t H, int64_t W, int64_t padding, bool aligned) {
  check_paste_args(masks, boxes, H, W, padding, std::nullopt);
  TORCH_CHECK(cuda_compat::on_kernel_device(masks), "paste_masks backward: CUDA kernel got ", masks.device(),
              " masks");
  check_backward_grad(grad_, masks, "paste_masks backward");
  const int64_t N = masks.size(0);
  TORCH_CHECK(grad_.dim() == 3 && grad_.size(0) == N && grad_.size(1) == H && grad_.size(2) == W,
              "paste_masks backward: the gradient must be a Tensor[", N, ", ", H, ", ", W, "], got shape ",
              grad_.sizes());
  cuda_compat::DeviceGuard guard(masks.device());
  const cudaStream_t stream = cuda_compat::current_stream();
  const int64_t pad = aligned ? 0 : padding;
  const at::Tensor grad = grad_.contiguous();
  const Prepared p = prepare(masks, boxes, H, W, pad, aligned, false, stream);
  return launch_paste_backward(p, grad, nullptr, H, W, pad, aligned, stream);
}

// Checks the forward's regions and offsets against the geometry and the
// gradient's size: one device-to-host copy (a synchronisation, as the crop
// forward has one).
at::Tensor paste_masks_crops_backward_cuda(const at::Tensor& grad_, const at::Tensor& masks,
                                           const at::Tensor& boxes, const at::Tensor& regions,
                                           const at::Tensor& offsets_, int64_t H, int64_t W, int64_t padding,
                                           bool aligned) {
  constexpr const char* kName = "paste_masks_crops backward";
  check_paste_args(masks, boxes, H, W, padding, std::nullopt);
  TORCH_CHECK(cuda_compat::on_kernel_device(masks), kName, ": CUDA kernel got ", masks.device(), " masks");
  check_backward_grad(grad_, masks, kName);
  const int64_t N = masks.size(0);
  TORCH_CHECK(regions.dim() == 2 && regions.size(0) == N && regions.size(1) == 4 &&
                  regions.scalar_type() == at::kLong && offsets_.dim() == 1 && offsets_.size(0) == N + 1 &&
                  offsets_.scalar_type() == at::kLong,
              kName, ": regions must be an int64 Tensor[", N, ", 4] and offsets an int64 Tensor[", N + 1,
              "], got ", regions.scalar_type(), " ", regions.sizes(), " and ", offsets_.scalar_type(), " ",
              offsets_.sizes());
  TORCH_CHECK(regions.device() == masks.device() && offsets_.device() == masks.device(), kName,
              ": regions and offsets must be on the masks' device ", masks.device());
  TORCH_CHECK(grad_.dim() == 1, kName, ": the gradient must be 1-D, got shape ", grad_.sizes());
  cuda_compat::DeviceGuard guard(masks.device());
  const cudaStream_t stream = cuda_compat::current_stream();
  const int64_t pad = aligned ? 0 : padding;
  const Prepared p = prepare(masks, boxes, H, W, pad, aligned, true, stream);
  const at::Tensor offsets = offsets_.contiguous();
  // [geometry's regions, its inclusive area sums, given regions, given offsets] in one copy.
  const at::Tensor host = at::cat({p.regions.flatten(), p.ends, regions.flatten(), offsets}).cpu();
  const int64_t* h = host.const_data_ptr<int64_t>();
  const int64_t *want = h, *ends = h + 4 * N, *got = h + 5 * N, *off = h + 9 * N;
  TORCH_CHECK(off[0] == 0, kName, ": offsets[0] must be 0, got ", off[0]);
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(std::equal(want + 4 * n, want + 4 * n + 4, got + 4 * n), kName, ": region (", got[4 * n], ", ",
                got[4 * n + 1], ", ", got[4 * n + 2], ", ", got[4 * n + 3], ") of mask ", n,
                " differs from the geometry's (", want[4 * n], ", ", want[4 * n + 1], ", ", want[4 * n + 2], ", ",
                want[4 * n + 3], ")");
    TORCH_CHECK(off[n + 1] == ends[n], kName, ": offsets[", n + 1, "] is ", off[n + 1], ", the regions give ",
                ends[n]);
  }
  TORCH_CHECK(grad_.numel() == off[N], kName, ": the gradient has ", grad_.numel(), " values, the crops ", off[N]);
  const at::Tensor grad = grad_.contiguous();
  return launch_paste_backward(p, grad, offsets.const_data_ptr<int64_t>(), H, W, pad, aligned, stream);
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("paste_masks", TORCH_FN(paste_masks_cuda));
  m.impl("paste_masks_crops", TORCH_FN(paste_masks_crops_cuda));
  m.impl("_paste_masks_backward", TORCH_FN(paste_masks_backward_cuda));
  m.impl("_paste_masks_crops_backward", TORCH_FN(paste_masks_crops_backward_cuda));
}

}  // namespace instseg
