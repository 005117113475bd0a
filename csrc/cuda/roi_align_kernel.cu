// RoIAlign forward and backward on CUDA, single- and multi-level (FPN): each
// RoI pools from the level levels[k] (level 0 for single-level roi_align), so
// all levels are served by one launch.
//
// All kernels run on the input's device (OptionalCUDAGuard) and the current
// stream, use grid-stride loops with int64 indices, accumulate half/bfloat16
// in float and read NCHW or channels_last inputs in place.
//   forward:   one thread per output element; for channels_last the channel is
//              the fastest index so that neighbouring threads read neighbouring
//              channels of the same pixel.
//   backward:  default: one thread per grad-output element, atomicAdd into a
//              float (double for double) buffer in the input's memory format.
//              deterministic: a gather over 16x16 pixel tiles. Each block owns
//              one tile of one image and 8 channels, scans the RoIs in index
//              order, and for every RoI that touches the tile builds its
//              per-row and per-column bilinear weights in shared memory; each
//              thread then owns one pixel and sums its contributions in a
//              fixed order. No atomics, no extra memory beyond the gradient.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda_compat.h"
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../feature_levels.h"
#include "../roi_align_checks.h"
#include "../roi_align_common.h"

namespace instseg {
namespace {

using namespace roi_align_detail;

constexpr int kThreads = 256;

inline unsigned int num_blocks(int64_t total) {
  const int64_t b = (total + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(b, 1), int64_t(1) << 20));
}

// Raises for a batch index outside [0, batch_size) and, when `levels` is given,
// a level outside [0, num_levels). One small device-to-host copy; skipped while
// the stream is being captured into a CUDA graph, where the kernels still treat
// such RoIs as empty (zeros, no gradient) instead of reading out of bounds.
void check_indices(const char* op, const at::Tensor& rois, int64_t batch_size,
                   const at::Tensor& levels = at::Tensor(), int64_t num_levels = 0) {
  if (rois.size(0) == 0) return;
  if (cuda_compat::stream_capturing()) return;
  const at::Tensor b = rois.select(1, 0);
  std::vector<at::Tensor> parts{b.min().to(at::kDouble), b.max().to(at::kDouble)};
  if (levels.defined()) {
    parts.push_back(levels.min().to(at::kDouble));
    parts.push_back(levels.max().to(at::kDouble));
  }
  const at::Tensor range = at::stack(parts).cpu();
  const double* r = range.data_ptr<double>();
  TORCH_CHECK(r[0] > -1.0 && r[1] < static_cast<double>(batch_size), op,
              ": rois[:, 0] holds batch indices in [", r[0], ", ", r[1],
              "], not all valid for an input with batch size ", batch_size);
  if (levels.defined()) {
    TORCH_CHECK(r[2] >= 0.0 && r[3] < static_cast<double>(num_levels), op, ": levels are in [",
                static_cast<int64_t>(r[2]), ", ", static_cast<int64_t>(r[3]),
                "], not all a valid level index for ", num_levels, " feature maps");
  }
}

// Up to kMaxLevels feature-map levels, passed to the kernels by value.
template <typename ptr_t>
struct LevelPack {
  ptr_t data[kMaxLevels];
  int64_t H[kMaxLevels];
  int64_t W[kMaxLevels];
  double scale[kMaxLevels];
  int64_t tiles_x[kMaxLevels];         // deterministic backward: tiles per row
  int64_t tile_start[kMaxLevels + 1];  // deterministic backward: first tile of each level
  int64_t L;
};

template <typename ptr_t>
LevelPack<ptr_t> make_pack(const std::vector<Level>& lv, const std::vector<ptr_t>& data,
                           int64_t tile) {
  LevelPack<ptr_t> p{};
  p.L = static_cast<int64_t>(lv.size());
  p.tile_start[0] = 0;
  for (int64_t l = 0; l < p.L; ++l) {
    p.data[l] = data[l];
    p.H[l] = lv[l].H;
    p.W[l] = lv[l].W;
    p.scale[l] = lv[l].scale;
    p.tiles_x[l] = (lv[l].W + tile - 1) / tile;
    p.tile_start[l + 1] = p.tile_start[l] + p.tiles_x[l] * ((lv[l].H + tile - 1) / tile);
  }
  return p;
}

// Level of RoI k, or -1 when the index is invalid or the level is empty (the
// RoI then gives zeros).
template <typename ptr_t>
__device__ __forceinline__ int64_t roi_level(const int64_t* levels, int64_t k,
                                             const LevelPack<ptr_t>& lv) {
  const int64_t l = levels ? levels[k] : 0;
  if (l < 0 || l >= lv.L || lv.H[l] == 0 || lv.W[l] == 0) return -1;
  return l;
}

// Calls f(y, x) for every sample of bin (ph, pw) that lies on the H x W map.
template <typename acc_t, typename F>
__device__ __forceinline__ void for_each_sample(const RoiGeometry<acc_t>& g, int64_t ph,
                                                int64_t pw, int64_t H, int64_t W, F&& f) {
  int64_t ylo, yhi, xlo, xhi;
  sample_range(g.start_h, g.bin_h, ph, g.grid_h, H, &ylo, &yhi);
  sample_range(g.start_w, g.bin_w, pw, g.grid_w, W, &xlo, &xhi);
  for (int64_t iy = ylo; iy < yhi; ++iy) {
    AxisSample<acc_t> y;
    if (!axis_sample(sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H, &y)) continue;
    for (int64_t ix = xlo; ix < xhi; ++ix) {
      AxisSample<acc_t> x;
      if (!axis_sample(sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), W, &x)) continue;
      f(y, x);
    }
  }
}

// Decodes a linear output index into (k, c, ph, pw) for the layout in use.
template <bool CL>
__device__ __forceinline__ void decode(int64_t idx, int64_t C, int64_t PH, int64_t PW,
                                       int64_t* k, int64_t* c, int64_t* ph, int64_t* pw) {
  if (CL) {
    *c = idx % C;
    idx /= C;
    *pw = idx % PW;
    idx /= PW;
    *ph = idx % PH;
    *k = idx / PH;
  } else {
    *pw = idx % PW;
    idx /= PW;
    *ph = idx % PH;
    idx /= PH;
    *c = idx % C;
    *k = idx / C;
  }
}

template <typename scalar_t, typename acc_t, bool CL>
__global__ void forward_kernel(int64_t total, LevelPack<const scalar_t*> lv,
                               const int64_t* __restrict__ levels, const acc_t* __restrict__ rois,
                               scalar_t* __restrict__ out, int64_t N, int64_t C, int64_t PH,
                               int64_t PW, int64_t sr, bool aligned) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    int64_t k, c, ph, pw;
    decode<CL>(idx, C, PH, PW, &k, &c, &ph, &pw);
    const int64_t l = roi_level(levels, k, lv);
    acc_t sum = 0;
    acc_t count = 1;
    if (l >= 0) {
      const int64_t H = lv.H[l], W = lv.W[l];
      const RoiGeometry<acc_t> g = roi_geometry(rois + k * 5, static_cast<acc_t>(lv.scale[l]), PH,
                                                PW, sr, aligned, N);
      count = g.count;
      if (g.valid) {
        // Element (y, x) of this channel is at plane[(y * W + x) * ps].
        const scalar_t* plane =
            CL ? lv.data[l] + g.batch * H * W * C + c : lv.data[l] + (g.batch * C + c) * H * W;
        const int64_t ps = CL ? C : 1;
        for_each_sample(g, ph, pw, H, W, [&](const AxisSample<acc_t>& y, const AxisSample<acc_t>& x) {
          sum += y.w_lo * x.w_lo * static_cast<acc_t>(plane[(y.lo * W + x.lo) * ps]) +
              y.w_lo * x.w_hi * static_cast<acc_t>(plane[(y.lo * W + x.hi) * ps]) +
              y.w_hi * x.w_lo * static_cast<acc_t>(plane[(y.hi * W + x.lo) * ps]) +
              y.w_hi * x.w_hi * static_cast<acc_t>(plane[(y.hi * W + x.hi) * ps]);
        });
      }
    }
    out[idx] = static_cast<scalar_t>(sum / count);
  }
}

template <typename scalar_t, typename acc_t, bool CL>
__global__ void backward_atomic_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                       int64_t gs0, int64_t gs1, int64_t gs2, int64_t gs3,
                                       const int64_t* __restrict__ levels,
                                       const acc_t* __restrict__ rois, LevelPack<acc_t*> lv,
                                       int64_t N, int64_t C, int64_t PH, int64_t PW, int64_t sr,
                                       bool aligned) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    int64_t k, c, ph, pw;
    decode<CL>(idx, C, PH, PW, &k, &c, &ph, &pw);
    const int64_t l = roi_level(levels, k, lv);
    if (l < 0) continue;
    const int64_t H = lv.H[l], W = lv.W[l];
    const RoiGeometry<acc_t> g =
        roi_geometry(rois + k * 5, static_cast<acc_t>(lv.scale[l]), PH, PW, sr, aligned, N);
    if (!g.valid) continue;
    const acc_t gv = static_cast<acc_t>(grad[k * gs0 + c * gs1 + ph * gs2 + pw * gs3]);
    acc_t* plane =
        CL ? lv.data[l] + g.batch * H * W * C + c : lv.data[l] + (g.batch * C + c) * H * W;
    const int64_t ps = CL ? C : 1;
    for_each_sample(g, ph, pw, H, W, [&](const AxisSample<acc_t>& y, const AxisSample<acc_t>& x) {
      atomicAdd(plane + (y.lo * W + x.lo) * ps, gv * (y.w_lo * x.w_lo) / g.count);
      atomicAdd(plane + (y.lo * W + x.hi) * ps, gv * (y.w_lo * x.w_hi) / g.count);
      atomicAdd(plane + (y.hi * W + x.lo) * ps, gv * (y.w_hi * x.w_lo) / g.count);
      atomicAdd(plane + (y.hi * W + x.hi) * ps, gv * (y.w_hi * x.w_hi) / g.count);
    });
  }
}

constexpr int kTile = 16;           // deterministic backward: tile edge in pixels
constexpr int kDetChannels = 8;     // channels per block
constexpr int kDetThreads = kTile * kTile;
static_assert(kDetThreads == 256, "the RoI list holds one entry per thread");

// Grid: x enumerates the 16x16 tiles of all levels (LevelPack::tile_start),
// z the (image, channel block) pairs.
template <typename scalar_t, typename acc_t, bool CL>
__global__ void __launch_bounds__(kDetThreads) backward_deterministic_kernel(
    const scalar_t* __restrict__ grad, int64_t gs0, int64_t gs1, int64_t gs2, int64_t gs3,
    const int64_t* __restrict__ levels, const acc_t* __restrict__ rois, int64_t K,
    LevelPack<scalar_t*> lv, int64_t N, int64_t C, int64_t PH, int64_t PW, int64_t sr,
    bool aligned, int64_t c_blocks) {
  INSTSEG_DYNAMIC_SHARED(unsigned char, smem, 16);
  acc_t* wy = reinterpret_cast<acc_t*>(smem);  // [PH][kTile] row weights of one RoI
  acc_t* wx = wy + PH * kTile;                 // [PW][kTile] column weights
  __shared__ int64_t list[kDetThreads];
  __shared__ int warp_base[kDetThreads / 32];
  __shared__ int list_n;

  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  int64_t lvl = 0;
  while (lvl + 1 < lv.L && int64_t(blockIdx.x) >= lv.tile_start[lvl + 1]) ++lvl;
  const int64_t tile = int64_t(blockIdx.x) - lv.tile_start[lvl];
  const int64_t H = lv.H[lvl], W = lv.W[lvl];
  const acc_t scale = static_cast<acc_t>(lv.scale[lvl]);
  scalar_t* __restrict__ gin = lv.data[lvl];
  const int64_t y0 = (tile / lv.tiles_x[lvl]) * kTile, x0 = (tile % lv.tiles_x[lvl]) * kTile;
  const int64_t y = y0 + threadIdx.y, x = x0 + threadIdx.x;
  const bool inside = y < H && x < W;

  for (int64_t z = blockIdx.z; z < N * c_blocks; z += gridDim.z) {
    const int64_t n = z / c_blocks, c0 = (z % c_blocks) * kDetChannels;
    acc_t acc[kDetChannels];
#pragma unroll
    for (int i = 0; i < kDetChannels; ++i) acc[i] = 0;

    for (int64_t base = 0; base < K; base += kDetThreads) {
      // 1. Which of these RoIs touch this tile? Compact them in index order.
      const int64_t k = base + tid;
      bool hit = false;
      if (k < K && (levels ? levels[k] : 0) == lvl) {
        const RoiGeometry<acc_t> g = roi_geometry(rois + k * 5, scale, PH, PW, sr, aligned, N);
        if (g.valid && g.batch == n) {
          int64_t r0, r1, q0, q1;
          touched_span(g.start_h, g.bin_h, PH, H, &r0, &r1);
          touched_span(g.start_w, g.bin_w, PW, W, &q0, &q1);
          hit = r0 <= r1 && q0 <= q1 && r1 >= y0 && r0 < y0 + kTile && q1 >= x0 &&
              q0 < x0 + kTile;
        }
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, hit);
      if (lane == 0) warp_base[warp] = __popc(ballot);
      __syncthreads();
      if (tid == 0) {
        int s = 0;
        for (int w = 0; w < kDetThreads / 32; ++w) {
          const int cnt = warp_base[w];
          warp_base[w] = s;
          s += cnt;
        }
        list_n = s;
      }
      __syncthreads();
      if (hit) list[warp_base[warp] + __popc(ballot & ((1u << lane) - 1u))] = k;
      __syncthreads();
      const int m = list_n;

      // 2. For each of them, in order: separable weights, then the gather.
      for (int j = 0; j < m; ++j) {
        const int64_t kk = list[j];
        const RoiGeometry<acc_t> g = roi_geometry(rois + kk * 5, scale, PH, PW, sr, aligned, N);
        // -0.0 marks "no sample here"; a touched entry becomes >= +0.0 even when
        // its weight is zero, so that a NaN/inf gradient still reaches every
        // pixel a sample touches, as in the atomic and CPU backwards.
        for (int64_t i = tid; i < (PH + PW) * kTile; i += kDetThreads) wy[i] = -acc_t(0);
        __syncthreads();
        for (int64_t p = tid; p < PH + PW; p += kDetThreads) {
          const bool is_y = p < PH;
          const int64_t q = is_y ? p : p - PH;
          const acc_t start = is_y ? g.start_h : g.start_w;
          const acc_t bin = is_y ? g.bin_h : g.bin_w;
          const int64_t grid = is_y ? g.grid_h : g.grid_w;
          const int64_t size = is_y ? H : W;
          const int64_t origin = is_y ? y0 : x0;
          acc_t* row = is_y ? wy + q * kTile : wx + q * kTile;
          int64_t lo, hi;
          sample_range(start, bin, q, grid, size, &lo, &hi);
          for (int64_t i = lo; i < hi; ++i) {
            AxisSample<acc_t> s;
            if (!axis_sample(sample_coord(start, bin, q, i, grid), size, &s)) continue;
            const int64_t a = s.lo - origin, b = s.hi - origin;
            if (a >= 0 && a < kTile) row[a] += s.w_lo;
            if (b >= 0 && b < kTile) row[b] += s.w_hi;
          }
        }
        __syncthreads();
        if (inside) {
          const scalar_t* gk = grad + kk * gs0 + c0 * gs1;
          for (int64_t ph = 0; ph < PH; ++ph) {
            const acc_t a = wy[ph * kTile + threadIdx.y];
            if (signbit(a)) continue;  // untouched row
            for (int64_t pw = 0; pw < PW; ++pw) {
              const acc_t b = wx[pw * kTile + threadIdx.x];
              if (signbit(b)) continue;  // untouched column
              const acc_t w = a * b / g.count;
              const scalar_t* gp = gk + ph * gs2 + pw * gs3;
#pragma unroll
              for (int i = 0; i < kDetChannels; ++i) {
                if (c0 + i < C) acc[i] += w * static_cast<acc_t>(gp[i * gs1]);
              }
            }
          }
        }
        __syncthreads();
      }
    }
    if (inside) {
#pragma unroll
      for (int i = 0; i < kDetChannels; ++i) {
        const int64_t c = c0 + i;
        if (c < C) {
          const int64_t off = CL ? ((n * H + y) * W + x) * C + c : ((n * C + c) * H + y) * W + x;
          gin[off] = static_cast<scalar_t>(acc[i]);
        }
      }
    }
  }
}

// Shared by roi_align and multilevel_roi_align. `feats` share one layout and
// are contiguous in it; `rois` are in acc dtype; `levels` may be undefined.
at::Tensor forward_impl(const std::vector<at::Tensor>& feats, const at::Tensor& rois,
                        const at::Tensor& levels, const std::vector<Level>& lv,
                        int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                        bool aligned, bool cl) {
  const at::Tensor& f0 = feats[0];
  const int64_t N = f0.size(0), C = f0.size(1), K = rois.size(0);
  at::Tensor out =
      at::empty({K, C, pooled_height, pooled_width}, f0.options().memory_format(memory_format(cl)));
  const int64_t total = out.numel();
  if (total == 0) return out;
  const cudaStream_t stream = cuda_compat::current_stream();
  const int64_t* lv_ptr = levels.defined() ? levels.data_ptr<int64_t>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(),
                                  "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<const scalar_t*> data;
    for (const at::Tensor& f : feats) data.push_back(f.data_ptr<scalar_t>());
    const LevelPack<const scalar_t*> pack = make_pack(lv, data, kTile);
    if (cl) {
      INSTSEG_LAUNCH((forward_kernel<scalar_t, acc_t, true>), num_blocks(total), kThreads, 0, stream,
          total, pack, lv_ptr, rois.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), N, C,
          pooled_height, pooled_width, sampling_ratio, aligned);
    } else {
      INSTSEG_LAUNCH((forward_kernel<scalar_t, acc_t, false>), num_blocks(total), kThreads, 0, stream,
          total, pack, lv_ptr, rois.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), N, C,
          pooled_height, pooled_width, sampling_ratio, aligned);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Shared by both backward ops: one input gradient per level.
std::vector<at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& rois,
                                      const at::Tensor& levels, const std::vector<Level>& lv,
                                      int64_t N, int64_t C, int64_t pooled_height,
                                      int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                      bool channels_last, bool deterministic) {
  const auto fmt = memory_format(channels_last);
  const int64_t K = rois.size(0);
  std::vector<at::Tensor> gins;
  if (K == 0 || N == 0 || C == 0) {
    // at::zeros ignores the memory format: empty(...).zero_() keeps it.
    for (const Level& l : lv) gins.push_back(at::empty({N, C, l.H, l.W}, grad.options().memory_format(fmt)).zero_());
    return gins;
  }
  const cudaStream_t stream = cuda_compat::current_stream();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1), gs2 = grad.stride(2),
                gs3 = grad.stride(3);
  const int64_t* lv_ptr = levels.defined() ? levels.data_ptr<int64_t>() : nullptr;

  if (deterministic) {
    const size_t acc_size = grad.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
    const size_t smem = size_t(pooled_height + pooled_width) * kTile * acc_size;
    // Dynamic shared memory for the weights, leaving room for the static RoI
    // list under the default 48 KiB per block.
    constexpr size_t kMaxSmem = 40 * 1024;
    TORCH_CHECK(smem <= kMaxSmem,
                "roi_align: the deterministic CUDA backward supports pooled_height + "
                "pooled_width up to ", kMaxSmem / (kTile * acc_size), ", got ",
                pooled_height + pooled_width);
    for (const Level& l : lv) gins.push_back(at::empty({N, C, l.H, l.W}, grad.options().memory_format(fmt)));
    const int64_t c_blocks = (C + kDetChannels - 1) / kDetChannels;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                    "roi_align_backward_deterministic_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      std::vector<scalar_t*> data;
      for (at::Tensor& t : gins) data.push_back(t.data_ptr<scalar_t>());
      const LevelPack<scalar_t*> pack = make_pack(lv, data, kTile);
      const int64_t tiles = pack.tile_start[pack.L];
      if (tiles == 0) return;
      TORCH_CHECK(tiles < (int64_t(1) << 31), "roi_align: feature maps too large for the "
                  "deterministic CUDA backward");
      const dim3 block(kTile, kTile);
      const dim3 blocks(static_cast<unsigned int>(tiles), 1,
                        static_cast<unsigned int>(std::min<int64_t>(N * c_blocks, 65535)));
      if (channels_last) {
        INSTSEG_LAUNCH((backward_deterministic_kernel<scalar_t, acc_t, true>), blocks, block, smem, stream,
            grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, lv_ptr, rois.data_ptr<acc_t>(), K,
            pack, N, C, pooled_height, pooled_width, sampling_ratio, aligned, c_blocks);
      } else {
        INSTSEG_LAUNCH((backward_deterministic_kernel<scalar_t, acc_t, false>), blocks, block, smem, stream,
            grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, lv_ptr, rois.data_ptr<acc_t>(), K,
            pack, N, C, pooled_height, pooled_width, sampling_ratio, aligned, c_blocks);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return gins;
  }

  at::globalContext().alertNotDeterministic(
      "instseg roi_align backward on CUDA with deterministic=False");
  // Accumulate in float (double for double) and convert at the end.
  const at::ScalarType acc_type = acc_dtype(grad.scalar_type());
  std::vector<at::Tensor> bufs;
  for (const Level& l : lv)
    bufs.push_back(at::empty({N, C, l.H, l.W}, grad.options().dtype(acc_type).memory_format(fmt)).zero_());
  const int64_t total = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    std::vector<acc_t*> data;
    for (at::Tensor& t : bufs) data.push_back(t.data_ptr<acc_t>());
    const LevelPack<acc_t*> pack = make_pack(lv, data, kTile);
    if (channels_last) {
      INSTSEG_LAUNCH((backward_atomic_kernel<scalar_t, acc_t, true>), num_blocks(total), kThreads, 0, stream,
          total, grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, lv_ptr, rois.data_ptr<acc_t>(),
          pack, N, C, pooled_height, pooled_width, sampling_ratio, aligned);
    } else {
      INSTSEG_LAUNCH((backward_atomic_kernel<scalar_t, acc_t, false>), num_blocks(total), kThreads, 0, stream,
          total, grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, lv_ptr, rois.data_ptr<acc_t>(),
          pack, N, C, pooled_height, pooled_width, sampling_ratio, aligned);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  for (at::Tensor& b : bufs) gins.push_back(acc_type == grad.scalar_type() ? b : b.to(grad.scalar_type()));
  return gins;
}

at::Tensor roi_align_forward_cuda(const at::Tensor& input, const at::Tensor& rois_,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                  bool /*deterministic*/) {
  check_roi_align_args(input, rois_, pooled_height, pooled_width);
  check_scales_and_sampling("roi_align", {spatial_scale}, sampling_ratio);
  TORCH_CHECK(cuda_compat::on_kernel_device(input), "roi_align: CUDA kernel got a ", input.device(), " input");
  cuda_compat::DeviceGuard guard(input.device());
  const bool cl = use_channels_last(input);
  const at::Tensor feat = cl ? input : input.contiguous();
  const at::Tensor rois = rois_.to(acc_dtype(input.scalar_type())).contiguous();
  check_indices("roi_align", rois, feat.size(0));
  return forward_impl({feat}, rois, at::Tensor(), {Level{feat.size(2), feat.size(3), spatial_scale}},
                      pooled_height, pooled_width, sampling_ratio, aligned, cl);
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois_,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio,
                                   bool aligned, bool channels_last, bool deterministic) {
  check_roi_align_backward_args(grad, rois_, pooled_height, pooled_width, batch_size, channels,
                                height, width);
  check_scales_and_sampling("_roi_align_backward", {spatial_scale}, sampling_ratio);
  TORCH_CHECK(cuda_compat::on_kernel_device(grad), "_roi_align_backward: CUDA kernel got a ", grad.device(), " grad");
  cuda_compat::DeviceGuard guard(grad.device());
  const at::Tensor rois = rois_.to(acc_dtype(grad.scalar_type())).contiguous();
  check_indices("_roi_align_backward", rois, batch_size);
  return backward_impl(grad, rois, at::Tensor(), {Level{height, width, spatial_scale}},
                       batch_size, channels, pooled_height, pooled_width, sampling_ratio,
                       aligned, channels_last, deterministic)[0];
}

// Multi-level: one launch each way. Invalid batch or level indices raise (one
// small device-to-host copy, see check_indices).
at::Tensor multilevel_roi_align_forward_cuda(at::TensorList features, const at::Tensor& rois,
                                             const at::Tensor& levels,
                                             at::ArrayRef<double> spatial_scales,
                                             int64_t pooled_height, int64_t pooled_width,
                                             int64_t sampling_ratio, bool aligned,
                                             bool /*deterministic*/) {
  check_multilevel_args(features, rois, levels, spatial_scales, pooled_height, pooled_width);
  check_scales_and_sampling("multilevel_roi_align", spatial_scales, sampling_ratio);
  TORCH_CHECK(cuda_compat::on_kernel_device(features[0]), "multilevel_roi_align: CUDA kernel got a ",
              features[0].device(), " input");
  cuda_compat::DeviceGuard guard(features[0].device());
  check_indices("multilevel_roi_align", rois, features[0].size(0), levels,
                static_cast<int64_t>(features.size()));
  const bool cl = use_channels_last(features[0]);
  const std::vector<at::Tensor> feats = same_layout(features, cl);
  return forward_impl(feats, rois.to(acc_dtype(feats[0].scalar_type())).contiguous(),
                      levels.contiguous(), levels_of(feats, spatial_scales), pooled_height,
                      pooled_width, sampling_ratio, aligned, cl);
}

std::vector<at::Tensor> multilevel_roi_align_backward_cuda(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> spatial_scales, int64_t pooled_height, int64_t pooled_width,
    at::IntArrayRef level_sizes, int64_t sampling_ratio, bool aligned, bool channels_last,
    bool deterministic) {
  const std::vector<Level> lv =
      check_multilevel_backward_args(grad, rois, levels, spatial_scales, pooled_height,
                                     pooled_width, level_sizes);
  check_scales_and_sampling("_multilevel_roi_align_backward", spatial_scales, sampling_ratio);
  TORCH_CHECK(cuda_compat::on_kernel_device(grad), "_multilevel_roi_align_backward: CUDA kernel got a ",
              grad.device(), " grad");
  cuda_compat::DeviceGuard guard(grad.device());
  check_indices("_multilevel_roi_align_backward", rois, level_sizes[0], levels,
                static_cast<int64_t>(lv.size()));
  return backward_impl(grad, rois.to(acc_dtype(grad.scalar_type())).contiguous(),
                       levels.contiguous(), lv, level_sizes[0], level_sizes[1], pooled_height,
                       pooled_width, sampling_ratio, aligned, channels_last, deterministic);
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cuda));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cuda));
  m.impl("multilevel_roi_align", TORCH_FN(multilevel_roi_align_forward_cuda));
  m.impl("_multilevel_roi_align_backward", TORCH_FN(multilevel_roi_align_backward_cuda));
}

}  // namespace instseg
