// Multi-scale deformable attention forward and backward on CUDA.
//
// All kernels run on value's device (OptionalCUDAGuard) and the current
// stream, use grid-stride loops with int64 indices, and accumulate
// half/bfloat16 in float (opmath). Locations and attention weights are used in
// float32 (float64 for float64 values), as on the CPU; the pixel coordinates
// are computed with exact_math, so both devices pick the same pixels.
//   forward:   one thread per output element (n, q, m, d), d fastest, so a
//              warp reads the contiguous channels of each bilinear neighbour.
//   backward:  one warp per (n, q, m): lanes split the D channels, and the
//              four neighbour dot products <grad_out, value> of every sample
//              are reduced with a fixed butterfly (deterministic) to give the
//              location and weight gradients. The value gradient is either
//                * atomic (default): atomicAdd into a float (double for
//                  double) buffer from the same warp, or
//                * deterministic: no floating-point atomics. Every
//                  (sample, neighbour) pair gets the key of the value row it
//                  touches; a stable sort of the keys gives, per value row,
//                  its contributions in index order (an inverse index), and
//                  one thread per value element sums them in that order.
//                  Memory: 4 keys per sample, plus the sort's.
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <tuple>

#include "../ms_deform_attn_checks.h"
#include "../ms_deform_attn_common.h"
#include "../tensor_utils.h"
#include "cuda_compat.h"

namespace instseg {
namespace {

using namespace msda_detail;

constexpr int kThreads = 256;
constexpr int kWarp = 32;

// Blocks of a grid-stride launch: enough for one item per thread, at most 2^20
// (INSTSEG_MSDA_MAX_BLOCKS lowers it, so that tests reach the grid-stride loops).
inline unsigned int num_blocks(int64_t total, int64_t per_block = kThreads) {
  const int64_t b = (total + per_block - 1) / per_block;
  const int64_t cap = std::max<int64_t>(1, cuda_compat::budget("INSTSEG_MSDA_MAX_BLOCKS", int64_t(1) << 20));
  return static_cast<unsigned int>(std::min<int64_t>(std::max<int64_t>(b, 1), cap));
}

// Problem sizes passed to the kernels by value.
struct Dims {
  int64_t N, S, M, D, Lq, L, P;
};

inline Dims dims_of(const MsdaSizes& s) { return Dims{s.N, s.S, s.M, s.D, s.Lq, s.L, s.P}; }

// Raises for an inconsistent level table (see check_level_table). Two tiny
// device-to-host copies; skipped while the stream is being captured into a
// CUDA graph, where the kernels instead give inconsistent levels no
// contribution (level_view) rather than reading out of bounds.
void check_levels_on_host(const char* op, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const MsdaSizes& s) {
  if (cuda_compat::stream_capturing()) return;
  const at::Tensor shapes = spatial_shapes.to(at::kCPU).contiguous();
  const at::Tensor starts = level_start_index.to(at::kCPU).contiguous();
  check_level_table(op, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), s.L, s.S);
}

template <typename scalar_t, typename acc_t>
__global__ void forward_kernel(int64_t total, Dims z, const scalar_t* __restrict__ value,
                               const int64_t* __restrict__ shapes,
                               const int64_t* __restrict__ starts, const acc_t* __restrict__ loc,
                               const acc_t* __restrict__ attn, scalar_t* __restrict__ out) {
  const int64_t MD = z.M * z.D;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = i % z.D;
    const int64_t u = i / z.D;  // (n * Lq + q) * M + m
    const int64_t m = u % z.M, n = u / z.M / z.Lq;
    const acc_t* lp = loc + u * z.L * z.P * 2;
    const acc_t* ap = attn + u * z.L * z.P;
    acc_t acc = 0;
    for (int64_t l = 0; l < z.L; ++l) {
      const LevelView lv = level_view(shapes, starts, l, z.S);
      const scalar_t* base = value + ((n * z.S + lv.start) * z.M + m) * z.D + d;
      for (int64_t p = 0; p < z.P; ++p) {
        const int64_t j = l * z.P + p;
        Bilinear<acc_t> b;
        if (!bilinear(lp[2 * j], lp[2 * j + 1], lv.H, lv.W, &b)) continue;
        const acc_t w = ap[j];
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (b.on[k]) acc += (w * b.weight(k)) * static_cast<acc_t>(base[b.pixel(k, lv.W) * MD]);
      }
    }
    out[i] = static_cast<scalar_t>(acc);
  }
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// One warp per (n, q, m) row. kAtomic: also atomically accumulate the value
// gradient into grad_value_acc.
template <typename scalar_t, typename acc_t, bool kAtomic>
__global__ void backward_sample_kernel(int64_t rows, Dims z, const scalar_t* __restrict__ grad_out,
                                       const scalar_t* __restrict__ value,
                                       const int64_t* __restrict__ shapes,
                                       const int64_t* __restrict__ starts,
                                       const acc_t* __restrict__ loc,
                                       const acc_t* __restrict__ attn, acc_t* grad_value_acc,
                                       acc_t* __restrict__ grad_loc,
                                       acc_t* __restrict__ grad_attn) {
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = blockDim.x / kWarp;
  // The loop bound depends on the warp only, so whole warps iterate together.
  for (int64_t u = blockIdx.x * warps + threadIdx.x / kWarp; u < rows; u += warps * gridDim.x) {
    const int64_t m = u % z.M, n = u / z.M / z.Lq;
    const scalar_t* go = grad_out + u * z.D;
    for (int64_t l = 0; l < z.L; ++l) {
      const LevelView lv = level_view(shapes, starts, l, z.S);
      const int64_t row0 = (n * z.S + lv.start) * z.M + m;
      for (int64_t p = 0; p < z.P; ++p) {
        const int64_t j = (u * z.L + l) * z.P + p;
        Bilinear<acc_t> b;
        if (!bilinear(loc[2 * j], loc[2 * j + 1], lv.H, lv.W, &b)) {
          if (lane == 0) grad_loc[2 * j] = grad_loc[2 * j + 1] = grad_attn[j] = acc_t(0);
          continue;
        }
        const acc_t w = attn[j];
        acc_t dot[4] = {0, 0, 0, 0};
        int64_t off[4];
        acc_t coef[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          off[k] = b.on[k] ? (row0 + b.pixel(k, lv.W) * z.M) * z.D : 0;
          coef[k] = w * b.weight(k);
        }
        for (int64_t d = lane; d < z.D; d += kWarp) {
          const acc_t g = static_cast<acc_t>(go[d]);
#pragma unroll
          for (int k = 0; k < 4; ++k) {
            if (!b.on[k]) continue;
            dot[k] += g * static_cast<acc_t>(value[off[k] + d]);
            if (kAtomic) atomicAdd(grad_value_acc + off[k] + d, coef[k] * g);
          }
        }
#pragma unroll
        for (int k = 0; k < 4; ++k) dot[k] = warp_sum(dot[k]);
        if (lane == 0) sample_grads(b, dot, w, lv.H, lv.W, &grad_attn[j], &grad_loc[2 * j],
                                    &grad_loc[2 * j + 1]);
      }
    }
  }
}

// Deterministic value gradient, step 1: the value row ((n * M + m) * S + s)
// touched by neighbour k of sample e, at keys[4 * e + k]; `none` (sorts last)
// when the neighbour is off the level or the sample contributes nothing.
template <typename acc_t, typename key_t>
__global__ void corner_keys_kernel(int64_t samples, Dims z, const int64_t* __restrict__ shapes,
                                   const int64_t* __restrict__ starts,
                                   const acc_t* __restrict__ loc, key_t none,
                                   key_t* __restrict__ keys) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < samples;
       e += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t l = (e / z.P) % z.L;
    const int64_t u = e / (z.L * z.P);
    const int64_t m = u % z.M, n = u / z.M / z.Lq;
    const LevelView lv = level_view(shapes, starts, l, z.S);
    Bilinear<acc_t> b;
    const bool ok = bilinear(loc[2 * e], loc[2 * e + 1], lv.H, lv.W, &b);
#pragma unroll
    for (int k = 0; k < 4; ++k)
      keys[4 * e + k] = ok && b.on[k]
                            ? static_cast<key_t>((n * z.M + m) * z.S + lv.start + b.pixel(k, lv.W))
                            : none;
  }
}

// Step 2: one thread per value element (n, s, m, d), d fastest. Entries
// [offsets[key], offsets[key + 1]) of `order` are its contributions
// (4 * sample + neighbour), in index order.
template <typename scalar_t, typename acc_t>
__global__ void gather_value_grad_kernel(int64_t total, Dims z, const scalar_t* __restrict__ grad_out,
                                         const int64_t* __restrict__ shapes,
                                         const int64_t* __restrict__ starts,
                                         const acc_t* __restrict__ loc,
                                         const acc_t* __restrict__ attn,
                                         const int64_t* __restrict__ offsets,
                                         const int64_t* __restrict__ order,
                                         scalar_t* __restrict__ grad_value) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t d = i % z.D;
    const int64_t r = i / z.D;  // (n * S + s) * M + m
    const int64_t m = r % z.M, s = (r / z.M) % z.S, n = r / z.M / z.S;
    const int64_t key = (n * z.M + m) * z.S + s;
    acc_t acc = 0;
    for (int64_t t = offsets[key]; t < offsets[key + 1]; ++t) {
      const int64_t entry = order[t];
      const int64_t e = entry >> 2;
      const int k = static_cast<int>(entry & 3);
      const int64_t l = (e / z.P) % z.L;
      const int64_t u = e / (z.L * z.P);
      const LevelView lv = level_view(shapes, starts, l, z.S);
      Bilinear<acc_t> b;
      bilinear(loc[2 * e], loc[2 * e + 1], lv.H, lv.W, &b);  // true: the entry exists
      acc += (attn[e] * b.weight(k)) * static_cast<acc_t>(grad_out[u * z.D + d]);
    }
    grad_value[i] = static_cast<scalar_t>(acc);
  }
}

at::Tensor ms_deform_attn_forward_cuda(const at::Tensor& value_, const at::Tensor& spatial_shapes,
                                       const at::Tensor& level_start_index,
                                       const at::Tensor& sampling_locations,
                                       const at::Tensor& attention_weights,
                                       bool /*deterministic*/) {
  const char* op = "ms_deform_attn";
  const MsdaSizes s = check_ms_deform_attn_args(op, value_, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights);
  TORCH_CHECK(cuda_compat::on_kernel_device(value_), op, ": CUDA kernel got a ", value_.device(), " value");
  cuda_compat::DeviceGuard guard(value_.device());
  check_levels_on_host(op, spatial_shapes, level_start_index, s);
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value_.options());
  const int64_t total = out.numel();
  if (total == 0) return out;
  const at::Tensor value = value_.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::ScalarType acc_type = acc_dtype(value.scalar_type());
  const at::Tensor loc = sampling_locations.to(acc_type).contiguous();
  const at::Tensor attn = attention_weights.to(acc_type).contiguous();
  const cudaStream_t stream = cuda_compat::current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    INSTSEG_LAUNCH((forward_kernel<scalar_t, acc_t>), num_blocks(total), kThreads, 0, stream,
        total, dims_of(s), value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
        starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
        out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The deterministic value gradient (see the header comment).
template <typename scalar_t, typename acc_t>
void deterministic_value_grad(const Dims& z, const at::Tensor& go, const at::Tensor& shapes,
                              const at::Tensor& starts, const at::Tensor& loc,
                              const at::Tensor& attn, at::Tensor& grad_value,
                              cudaStream_t stream) {
  const int64_t samples = z.N * z.Lq * z.M * z.L * z.P;
  const int64_t rows = z.N * z.M * z.S;  // value rows; `rows` itself is the "none" key
  const auto idx_opts = loc.options().dtype(at::kLong);
  at::Tensor sorted, order;
  // 32-bit keys sort about twice as fast; int64 when the rows need it.
  if (rows < std::numeric_limits<int32_t>::max()) {
    at::Tensor keys = at::empty({4 * samples}, loc.options().dtype(at::kInt));
    INSTSEG_LAUNCH((corner_keys_kernel<acc_t, int32_t>), num_blocks(samples), kThreads, 0, stream,
        samples, z, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        loc.data_ptr<acc_t>(), static_cast<int32_t>(rows), keys.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::tie(sorted, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  } else {
    at::Tensor keys = at::empty({4 * samples}, idx_opts);
    INSTSEG_LAUNCH((corner_keys_kernel<acc_t, int64_t>), num_blocks(samples), kThreads, 0, stream,
        samples, z, shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
        loc.data_ptr<acc_t>(), rows, keys.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    std::tie(sorted, order) = at::sort(keys, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  }
  // offsets[r] = first entry with key >= r, for r = 0 .. rows.
  const at::Tensor offsets =
      at::searchsorted(sorted, at::arange(rows + 1, sorted.options()), /*out_int32=*/false,
                       /*right=*/false)
          .contiguous();
  order = order.contiguous();
  const int64_t total = grad_value.numel();
  INSTSEG_LAUNCH((gather_value_grad_kernel<scalar_t, acc_t>), num_blocks(total), kThreads, 0, stream,
      total, z, go.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
      loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(), offsets.data_ptr<int64_t>(),
      order.data_ptr<int64_t>(), grad_value.data_ptr<scalar_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value_, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool deterministic) {
  const char* op = "_ms_deform_attn_backward";
  const MsdaSizes s = check_ms_deform_attn_args(op, value_, spatial_shapes, level_start_index,
                                                sampling_locations, attention_weights);
  check_grad_output(op, grad_output, value_, s);
  TORCH_CHECK(cuda_compat::on_kernel_device(value_), op, ": CUDA kernel got a ", value_.device(), " value");
  cuda_compat::DeviceGuard guard(value_.device());
  check_levels_on_host(op, spatial_shapes, level_start_index, s);
  const at::ScalarType acc_type = acc_dtype(value_.scalar_type());
  const at::Tensor value = value_.contiguous();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.to(acc_type).contiguous();
  const at::Tensor attn = attention_weights.to(acc_type).contiguous();
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  at::Tensor grad_value;
  const Dims z = dims_of(s);
  const int64_t rows = s.N * s.Lq * s.M;
  const bool any_work = attn.numel() > 0 && s.D > 0;
  const cudaStream_t stream = cuda_compat::current_stream();
  if (!deterministic && any_work)
    at::globalContext().alertNotDeterministic(
        "instseg ms_deform_attn backward on CUDA with deterministic=False");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (!any_work) {
      grad_value = at::zeros(value.sizes(), value.options());
      grad_loc.zero_();
      grad_attn.zero_();
      return;
    }
    const unsigned int blocks = num_blocks(rows, kThreads / kWarp);
    if (deterministic) {
      INSTSEG_LAUNCH((backward_sample_kernel<scalar_t, acc_t, false>), blocks, kThreads, 0, stream,
          rows, z, go.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(),
          attn.data_ptr<acc_t>(), nullptr, grad_loc.data_ptr<acc_t>(),
          grad_attn.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_value = at::empty(value.sizes(), value.options());
      if (grad_value.numel() > 0)
        deterministic_value_grad<scalar_t, acc_t>(z, go, shapes, starts, loc, attn, grad_value,
                                                  stream);
    } else {
      at::Tensor buf = at::zeros(value.sizes(), value.options().dtype(acc_type));
      INSTSEG_LAUNCH((backward_sample_kernel<scalar_t, acc_t, true>), blocks, kThreads, 0, stream,
          rows, z, go.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
          shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(),
          attn.data_ptr<acc_t>(), buf.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
          grad_attn.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_value = acc_type == value.scalar_type() ? buf : buf.to(value.scalar_type());
    }
  });
  return {grad_value, grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

INSTSEG_CUDA_LIBRARY_IMPL(m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_forward_cuda));
  m.impl("_ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_cuda));
}

}  // namespace instseg
