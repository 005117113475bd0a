// RoIAlign forward and backward on CUDA.
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
#include <torch/library.h>

#include <algorithm>

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

bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Raises for a batch index outside [0, batch_size). One small device-to-host
// copy; skipped while the stream is being captured into a CUDA graph, where
// the kernels still treat such RoIs as empty instead of reading out of bounds.
void check_batch_indices(const at::Tensor& rois, int64_t batch_size) {
  if (rois.size(0) == 0) return;
  if (c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None) return;
  const at::Tensor b = rois.select(1, 0);
  const at::Tensor range = at::stack({b.min(), b.max()}).to(at::kDouble).cpu();
  const double lo = range.data_ptr<double>()[0], hi = range.data_ptr<double>()[1];
  TORCH_CHECK(lo > -1.0 && hi < static_cast<double>(batch_size),
              "roi_align: rois[:, 0] holds batch indices in [", lo, ", ", hi,
              "], not all valid for an input with batch size ", batch_size);
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
__global__ void forward_kernel(int64_t total, const scalar_t* __restrict__ in,
                               const acc_t* __restrict__ rois, scalar_t* __restrict__ out,
                               int64_t N, int64_t C, int64_t H, int64_t W, int64_t PH,
                               int64_t PW, acc_t scale, int64_t sr, bool aligned) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    int64_t k, c, ph, pw;
    decode<CL>(idx, C, PH, PW, &k, &c, &ph, &pw);
    const RoiGeometry<acc_t> g = roi_geometry(rois + k * 5, scale, PH, PW, sr, aligned, N);
    acc_t sum = 0;
    if (g.valid) {
      // Element (y, x) of this channel is at plane[(y * W + x) * ps].
      const scalar_t* plane = CL ? in + g.batch * H * W * C + c : in + (g.batch * C + c) * H * W;
      const int64_t ps = CL ? C : 1;
      int64_t ylo, yhi, xlo, xhi;
      sample_range(g.start_h, g.bin_h, ph, g.grid_h, H, &ylo, &yhi);
      sample_range(g.start_w, g.bin_w, pw, g.grid_w, W, &xlo, &xhi);
      for (int64_t iy = ylo; iy < yhi; ++iy) {
        AxisSample<acc_t> y;
        if (!axis_sample(sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H, &y)) continue;
        for (int64_t ix = xlo; ix < xhi; ++ix) {
          AxisSample<acc_t> x;
          if (!axis_sample(sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), W, &x)) continue;
          sum += y.w_lo * x.w_lo * static_cast<acc_t>(plane[(y.lo * W + x.lo) * ps]) +
              y.w_lo * x.w_hi * static_cast<acc_t>(plane[(y.lo * W + x.hi) * ps]) +
              y.w_hi * x.w_lo * static_cast<acc_t>(plane[(y.hi * W + x.lo) * ps]) +
              y.w_hi * x.w_hi * static_cast<acc_t>(plane[(y.hi * W + x.hi) * ps]);
        }
      }
    }
    out[idx] = static_cast<scalar_t>(sum / g.count);
  }
}

template <typename scalar_t, typename acc_t, bool CL>
__global__ void backward_atomic_kernel(int64_t total, const scalar_t* __restrict__ grad,
                                       int64_t gs0, int64_t gs1, int64_t gs2, int64_t gs3,
                                       const acc_t* __restrict__ rois, acc_t* __restrict__ gin,
                                       int64_t N, int64_t C, int64_t H, int64_t W, int64_t PH,
                                       int64_t PW, acc_t scale, int64_t sr, bool aligned) {
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(blockDim.x) * gridDim.x) {
    int64_t k, c, ph, pw;
    decode<CL>(idx, C, PH, PW, &k, &c, &ph, &pw);
    const RoiGeometry<acc_t> g = roi_geometry(rois + k * 5, scale, PH, PW, sr, aligned, N);
    if (!g.valid) continue;
    const acc_t gv = static_cast<acc_t>(grad[k * gs0 + c * gs1 + ph * gs2 + pw * gs3]);
    acc_t* plane = CL ? gin + g.batch * H * W * C + c : gin + (g.batch * C + c) * H * W;
    const int64_t ps = CL ? C : 1;
    int64_t ylo, yhi, xlo, xhi;
    sample_range(g.start_h, g.bin_h, ph, g.grid_h, H, &ylo, &yhi);
    sample_range(g.start_w, g.bin_w, pw, g.grid_w, W, &xlo, &xhi);
    for (int64_t iy = ylo; iy < yhi; ++iy) {
      AxisSample<acc_t> y;
      if (!axis_sample(sample_coord(g.start_h, g.bin_h, ph, iy, g.grid_h), H, &y)) continue;
      for (int64_t ix = xlo; ix < xhi; ++ix) {
        AxisSample<acc_t> x;
        if (!axis_sample(sample_coord(g.start_w, g.bin_w, pw, ix, g.grid_w), W, &x)) continue;
        atomicAdd(plane + (y.lo * W + x.lo) * ps, gv * (y.w_lo * x.w_lo) / g.count);
        atomicAdd(plane + (y.lo * W + x.hi) * ps, gv * (y.w_lo * x.w_hi) / g.count);
        atomicAdd(plane + (y.hi * W + x.lo) * ps, gv * (y.w_hi * x.w_lo) / g.count);
        atomicAdd(plane + (y.hi * W + x.hi) * ps, gv * (y.w_hi * x.w_hi) / g.count);
      }
    }
  }
}

constexpr int kTile = 16;           // deterministic backward: tile edge in pixels
constexpr int kDetChannels = 8;     // channels per block
constexpr int kDetThreads = kTile * kTile;
static_assert(kDetThreads == 256, "the RoI list holds one entry per thread");

template <typename scalar_t, typename acc_t, bool CL>
__global__ void __launch_bounds__(kDetThreads) backward_deterministic_kernel(
    const scalar_t* __restrict__ grad, int64_t gs0, int64_t gs1, int64_t gs2, int64_t gs3,
    const acc_t* __restrict__ rois, int64_t K, scalar_t* __restrict__ gin, int64_t N, int64_t C,
    int64_t H, int64_t W, int64_t PH, int64_t PW, acc_t scale, int64_t sr, bool aligned,
    int64_t c_blocks) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* wy = reinterpret_cast<acc_t*>(smem);  // [PH][kTile] row weights of one RoI
  acc_t* wx = wy + PH * kTile;                 // [PW][kTile] column weights
  __shared__ int64_t list[kDetThreads];
  __shared__ int warp_base[kDetThreads / 32];
  __shared__ int list_n;

  const int tid = threadIdx.y * kTile + threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int64_t y0 = int64_t(blockIdx.y) * kTile, x0 = int64_t(blockIdx.x) * kTile;
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
      if (k < K) {
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
        for (int64_t i = tid; i < (PH + PW) * kTile; i += kDetThreads) wy[i] = 0;
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
            if (a == acc_t(0)) continue;
            for (int64_t pw = 0; pw < PW; ++pw) {
              const acc_t b = wx[pw * kTile + threadIdx.x];
              if (b == acc_t(0)) continue;
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

at::Tensor roi_align_forward_cuda(const at::Tensor& input_, const at::Tensor& rois_,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                  bool /*deterministic*/) {
  check_roi_align_args(input_, rois_, pooled_height, pooled_width);
  TORCH_CHECK(input_.is_cuda(), "roi_align: CUDA kernel got a ", input_.device(), " input");
  c10::cuda::OptionalCUDAGuard guard(input_.device());
  const bool cl = use_channels_last(input_);
  const at::Tensor input = cl ? input_ : input_.contiguous();
  const at::Tensor rois = rois_.to(acc_dtype(input.scalar_type())).contiguous();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0);
  const auto fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  check_batch_indices(rois, N);
  if (H == 0 || W == 0) return at::zeros({K, C, pooled_height, pooled_width}, input.options().memory_format(fmt));
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width}, input.options(), fmt);
  const int64_t total = out.numel();
  if (total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "roi_align_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(spatial_scale);
    if (cl) {
      forward_kernel<scalar_t, acc_t, true><<<num_blocks(total), kThreads, 0, stream>>>(
          total, input.data_ptr<scalar_t>(), rois.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
          N, C, H, W, pooled_height, pooled_width, scale, sampling_ratio, aligned);
    } else {
      forward_kernel<scalar_t, acc_t, false><<<num_blocks(total), kThreads, 0, stream>>>(
          total, input.data_ptr<scalar_t>(), rois.data_ptr<acc_t>(), out.data_ptr<scalar_t>(),
          N, C, H, W, pooled_height, pooled_width, scale, sampling_ratio, aligned);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor roi_align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois_,
                                   double spatial_scale, int64_t pooled_height,
                                   int64_t pooled_width, int64_t batch_size, int64_t channels,
                                   int64_t height, int64_t width, int64_t sampling_ratio,
                                   bool aligned, bool channels_last, bool deterministic) {
  check_roi_align_backward_args(grad, rois_, pooled_height, pooled_width, batch_size, channels,
                                height, width);
  TORCH_CHECK(grad.is_cuda(), "_roi_align_backward: CUDA kernel got a ", grad.device(), " grad");
  c10::cuda::OptionalCUDAGuard guard(grad.device());
  const at::Tensor rois = rois_.to(acc_dtype(grad.scalar_type())).contiguous();
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const int64_t K = rois.size(0);
  check_batch_indices(rois, batch_size);
  if (K == 0 || height == 0 || width == 0 || channels == 0 || batch_size == 0) {
    return at::zeros({batch_size, channels, height, width}, grad.options().memory_format(fmt));
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t gs0 = grad.stride(0), gs1 = grad.stride(1), gs2 = grad.stride(2),
                gs3 = grad.stride(3);

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
    at::Tensor gin = at::empty({batch_size, channels, height, width}, grad.options(), fmt);
    const int64_t c_blocks = (channels + kDetChannels - 1) / kDetChannels;
    const dim3 block(kTile, kTile);
    const dim3 blocks(static_cast<unsigned int>((width + kTile - 1) / kTile),
                      static_cast<unsigned int>((height + kTile - 1) / kTile),
                      static_cast<unsigned int>(std::min<int64_t>(batch_size * c_blocks, 65535)));
    TORCH_CHECK((height + kTile - 1) / kTile <= 65535,
                "roi_align: input height too large for the deterministic CUDA backward");
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                    "roi_align_backward_deterministic_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const acc_t scale = static_cast<acc_t>(spatial_scale);
      if (channels_last) {
        backward_deterministic_kernel<scalar_t, acc_t, true><<<blocks, block, smem, stream>>>(
            grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, rois.data_ptr<acc_t>(), K,
            gin.data_ptr<scalar_t>(), batch_size, channels, height, width, pooled_height,
            pooled_width, scale, sampling_ratio, aligned, c_blocks);
      } else {
        backward_deterministic_kernel<scalar_t, acc_t, false><<<blocks, block, smem, stream>>>(
            grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, rois.data_ptr<acc_t>(), K,
            gin.data_ptr<scalar_t>(), batch_size, channels, height, width, pooled_height,
            pooled_width, scale, sampling_ratio, aligned, c_blocks);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return gin;
  }

  at::globalContext().alertNotDeterministic("instseg::_roi_align_backward (CUDA, deterministic=False)");
  // Accumulate in float (double for double) and convert at the end.
  const bool direct = grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble;
  at::Tensor buf = at::zeros({batch_size, channels, height, width},
                             grad.options().dtype(acc_dtype(grad.scalar_type())).memory_format(fmt));
  const int64_t total = grad.numel();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "roi_align_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t scale = static_cast<acc_t>(spatial_scale);
    if (channels_last) {
      backward_atomic_kernel<scalar_t, acc_t, true><<<num_blocks(total), kThreads, 0, stream>>>(
          total, grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, rois.data_ptr<acc_t>(),
          buf.data_ptr<acc_t>(), batch_size, channels, height, width, pooled_height,
          pooled_width, scale, sampling_ratio, aligned);
    } else {
      backward_atomic_kernel<scalar_t, acc_t, false><<<num_blocks(total), kThreads, 0, stream>>>(
          total, grad.data_ptr<scalar_t>(), gs0, gs1, gs2, gs3, rois.data_ptr<acc_t>(),
          buf.data_ptr<acc_t>(), batch_size, channels, height, width, pooled_height,
          pooled_width, scale, sampling_ratio, aligned);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return direct ? buf : buf.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CUDA, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cuda));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cuda));
}

}  // namespace instseg
