// Multi-scale deformable attention forward and backward on the CPU.
//
// value [N, S, M, D] is read in place when contiguous: the D channels of one
// head at one pixel are contiguous, so every bilinear neighbour is one short
// contiguous row, and all loops over channels are unit-stride. Locations and
// attention weights are used in float32 (float64 for float64 values);
// half/bfloat16 values accumulate in float32.
//
// Parallelism (at::parallel_for), race-free and independent of the number of
// threads:
//   forward:  tasks are (n, q, m) output rows, visited head by head (all
//             queries of head m of image n, then the next head), which keeps
//             one head's values in cache instead of all heads'.
//   backward: tasks are (n, m) heads. A task owns grad_value[n, :, m, :] and
//             the location/weight gradients of its head, and visits queries,
//             levels and points in index order, so value gradients are summed
//             in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

#include "../ms_deform_attn_checks.h"
#include "../ms_deform_attn_common.h"
#include "../tensor_utils.h"

namespace instseg {
namespace {

using namespace msda_detail;

// Width of the unrolled channel loops in the backward (one AVX2 float vector).
constexpr int kLanes = 8;

// Checks everything, including the level table's values, and returns the
// sizes; `shapes`/`starts` receive contiguous copies of the level table.
MsdaSizes check_all(const char* op, const at::Tensor& value, const at::Tensor& spatial_shapes,
                    const at::Tensor& level_start_index, const at::Tensor& loc,
                    const at::Tensor& attn, at::Tensor* shapes, at::Tensor* starts) {
  const MsdaSizes s =
      check_ms_deform_attn_args(op, value, spatial_shapes, level_start_index, loc, attn);
  TORCH_CHECK(value.device().is_cpu(), op, ": CPU kernel got a ", value.device(), " value");
  *shapes = spatial_shapes.contiguous();
  *starts = level_start_index.contiguous();
  check_level_table(op, shapes->data_ptr<int64_t>(), starts->data_ptr<int64_t>(), s.L, s.S);
  return s;
}

// The value rows of the bilinear neighbours are scattered over the levels, so
// the loops are bound by memory latency: before working on one (n, q, m) row,
// prefetch the neighbours of the next one (their value rows and, in the
// backward, their value-gradient rows).
template <typename acc_t, typename T1, typename T2>
inline void prefetch_taps(int64_t u, const MsdaSizes& s, const int64_t* shapes,
                          const int64_t* starts, const acc_t* loc, const T1* rows1,
                          const T2* rows2, int64_t l_begin, int64_t l_end) {
  const int64_t n = u / s.M / s.Lq, m = u % s.M;
  const acc_t* lp = loc + u * s.L * s.P * 2;
  for (int64_t l = l_begin; l < l_end; ++l) {
    const LevelView lv = level_view(shapes, starts, l, s.S);
    const int64_t row0 = (n * s.S + lv.start) * s.M + m;
    for (int64_t p = 0; p < s.P; ++p) {
      const int64_t i = l * s.P + p;
      Bilinear<acc_t> b;
      if (!bilinear(lp[2 * i], lp[2 * i + 1], lv.H, lv.W, &b)) continue;
      for (int k = 0; k < 4; ++k) {
        if (!b.on[k]) continue;
        const int64_t o = (row0 + b.pixel(k, lv.W) * s.M) * s.D;
        for (int64_t c = 0; c < s.D; c += 64 / static_cast<int64_t>(sizeof(T1)))
          __builtin_prefetch(rows1 + o + c);
        if (rows2 != nullptr)
          for (int64_t c = 0; c < s.D; c += 64 / static_cast<int64_t>(sizeof(T2)))
            __builtin_prefetch(rows2 + o + c, 1);
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void forward_kernel(const MsdaSizes& s, const scalar_t* value, const int64_t* shapes,
                    const int64_t* starts, const acc_t* loc, const acc_t* attn, scalar_t* out) {
  const int64_t N = s.N, S = s.S, M = s.M, D = s.D, Lq = s.Lq, L = s.L, P = s.P;
  const int64_t MD = M * D;
  const int64_t rows = N * Lq * M;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, L * P * D));
  // Rows are visited head by head, t = (n * M + m) * Lq + q, so that a thread
  // works on one head's values (S x D of the N x S x M x D) at a time.
  const auto row_of = [&](int64_t t) {  // u = (n * Lq + q) * M + m
    const int64_t q = t % Lq, nm = t / Lq;
    return ((nm / M) * Lq + q) * M + nm % M;
  };
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(D);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t u = row_of(t);
      if (t + 1 < end)
        prefetch_taps<acc_t, scalar_t, acc_t>(row_of(t + 1), s, shapes, starts, loc, value, nullptr,
                                              0, L);
      const int64_t m = u % M, n = u / M / Lq;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* a = acc.data();
      const acc_t* lp = loc + u * L * P * 2;
      const acc_t* ap = attn + u * L * P;
      for (int64_t l = 0; l < L; ++l) {
        const LevelView lv = level_view(shapes, starts, l, S);
        const scalar_t* base = value + ((n * S + lv.start) * M + m) * D;
        for (int64_t p = 0; p < P; ++p) {
          const int64_t i = l * P + p;
          Bilinear<acc_t> b;
          if (!bilinear(lp[2 * i], lp[2 * i + 1], lv.H, lv.W, &b)) continue;
          const acc_t w = ap[i];
          if (b.all_on()) {
            const scalar_t* r0 = base + b.pixel(0, lv.W) * MD;
            const scalar_t* r1 = r0 + MD;
            const scalar_t* r2 = r0 + lv.W * MD;
            const scalar_t* r3 = r2 + MD;
            const acc_t c0 = w * b.weight(0), c1 = w * b.weight(1), c2 = w * b.weight(2),
                        c3 = w * b.weight(3);
            for (int64_t d = 0; d < D; ++d)
              a[d] += c0 * static_cast<acc_t>(r0[d]) + c1 * static_cast<acc_t>(r1[d]) +
                      c2 * static_cast<acc_t>(r2[d]) + c3 * static_cast<acc_t>(r3[d]);
          } else {
            for (int k = 0; k < 4; ++k) {
              if (!b.on[k]) continue;
              const scalar_t* r = base + b.pixel(k, lv.W) * MD;
              const acc_t c = w * b.weight(k);
              for (int64_t d = 0; d < D; ++d) a[d] += c * static_cast<acc_t>(r[d]);
            }
          }
        }
      }
      scalar_t* o = out + u * D;
      for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(a[d]);
    }
  });
}

// grad_value: zeroed accumulator [N, S, M, D] in acc_t; grad_loc / grad_attn
// are fully written.
template <typename scalar_t, typename acc_t>
void backward_kernel(const MsdaSizes& s, const scalar_t* grad_out, const scalar_t* value,
                     const int64_t* shapes, const int64_t* starts, const acc_t* loc,
                     const acc_t* attn, acc_t* grad_value, acc_t* grad_loc, acc_t* grad_attn) {
  const int64_t N = s.N, S = s.S, M = s.M, D = s.D, Lq = s.Lq, L = s.L, P = s.P;
  const int64_t MD = M * D;
  at::parallel_for(0, N * M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gbuf(D);
    acc_t* __restrict__ g = gbuf.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / M, m = t % M;
      // Level by level, so that one level of one head is the working set.
      for (int64_t l = 0; l < L; ++l) {
        const LevelView lv = level_view(shapes, starts, l, S);
        const int64_t row0 = (n * S + lv.start) * M + m;  // value row of pixel 0, in units of D
        for (int64_t q = 0; q < Lq; ++q) {
          const int64_t u = (n * Lq + q) * M + m;
          if (q + 1 < Lq)
            prefetch_taps<acc_t, scalar_t, acc_t>(u + M, s, shapes, starts, loc, value, grad_value,
                                                  l, l + 1);
          const scalar_t* go = grad_out + u * D;
          for (int64_t d = 0; d < D; ++d) g[d] = static_cast<acc_t>(go[d]);
          const acc_t* lp = loc + u * L * P * 2;
          const acc_t* ap = attn + u * L * P;
          acc_t* glp = grad_loc + u * L * P * 2;
          acc_t* gap = grad_attn + u * L * P;
          for (int64_t p = 0; p < P; ++p) {
            const int64_t i = l * P + p;
            Bilinear<acc_t> b;
            if (!bilinear(lp[2 * i], lp[2 * i + 1], lv.H, lv.W, &b)) {
              glp[2 * i] = glp[2 * i + 1] = gap[i] = acc_t(0);
              continue;
            }
            const acc_t w = ap[i];
            acc_t dot[4] = {0, 0, 0, 0};
            if (b.all_on()) {
              const int64_t o0 = (row0 + b.pixel(0, lv.W) * M) * D;
              const int64_t o1 = o0 + MD, o2 = o0 + lv.W * MD, o3 = o2 + MD;
              const scalar_t *__restrict__ v0 = value + o0, *__restrict__ v1 = value + o1,
                             *__restrict__ v2 = value + o2, *__restrict__ v3 = value + o3;
              acc_t *__restrict__ gv0 = grad_value + o0, *__restrict__ gv1 = grad_value + o1,
                    *__restrict__ gv2 = grad_value + o2, *__restrict__ gv3 = grad_value + o3;
              const acc_t c0 = w * b.weight(0), c1 = w * b.weight(1), c2 = w * b.weight(2),
                          c3 = w * b.weight(3);
              // kLanes independent partial sums per dot product, so that the
              // compiler can vectorise the reductions without reassociating.
              acc_t s0[kLanes] = {}, s1[kLanes] = {}, s2[kLanes] = {}, s3[kLanes] = {};
              int64_t d = 0;
              for (; d + kLanes <= D; d += kLanes) {
                for (int j = 0; j < kLanes; ++j) {
                  const acc_t gd = g[d + j];
                  s0[j] += gd * static_cast<acc_t>(v0[d + j]);
                  s1[j] += gd * static_cast<acc_t>(v1[d + j]);
                  s2[j] += gd * static_cast<acc_t>(v2[d + j]);
                  s3[j] += gd * static_cast<acc_t>(v3[d + j]);
                  gv0[d + j] += c0 * gd;
                  gv1[d + j] += c1 * gd;
                  gv2[d + j] += c2 * gd;
                  gv3[d + j] += c3 * gd;
                }
              }
              for (int64_t j = 0; d < D; ++d, ++j) {
                const acc_t gd = g[d];
                s0[j] += gd * static_cast<acc_t>(v0[d]);
                s1[j] += gd * static_cast<acc_t>(v1[d]);
                s2[j] += gd * static_cast<acc_t>(v2[d]);
                s3[j] += gd * static_cast<acc_t>(v3[d]);
                gv0[d] += c0 * gd;
                gv1[d] += c1 * gd;
                gv2[d] += c2 * gd;
                gv3[d] += c3 * gd;
              }
              for (int j = 0; j < kLanes; ++j) {
                dot[0] += s0[j];
                dot[1] += s1[j];
                dot[2] += s2[j];
                dot[3] += s3[j];
              }
            } else {
              for (int k = 0; k < 4; ++k) {
                if (!b.on[k]) continue;
                const int64_t o = (row0 + b.pixel(k, lv.W) * M) * D;
                const scalar_t* v = value + o;
                acc_t* gv = grad_value + o;
                const acc_t c = w * b.weight(k);
                acc_t sk = 0;
                for (int64_t d = 0; d < D; ++d) {
                  sk += g[d] * static_cast<acc_t>(v[d]);
                  gv[d] += c * g[d];
                }
                dot[k] = sk;
              }
            }
            sample_grads(b, dot, w, lv.H, lv.W, &gap[i], &glp[2 * i], &glp[2 * i + 1]);
          }
        }
      }
    }
  });
}

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value_, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations,
                                      const at::Tensor& attention_weights,
                                      bool /*deterministic*/) {
  at::Tensor shapes, starts;
  const MsdaSizes s = check_all("ms_deform_attn", value_, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights, &shapes, &starts);
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value_.options());
  if (out.numel() == 0) return out;
  const at::Tensor value = value_.contiguous();
  const at::ScalarType acc_type = acc_dtype(value.scalar_type());
  const at::Tensor loc = sampling_locations.to(acc_type).contiguous();
  const at::Tensor attn = attention_weights.to(acc_type).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                  "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    forward_kernel<scalar_t, acc_t>(s, value.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
                                    starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(),
                                    attn.data_ptr<acc_t>(), out.data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value_, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
    const at::Tensor& attention_weights, bool /*deterministic*/) {
  const char* op = "_ms_deform_attn_backward";
  at::Tensor shapes, starts;
  const MsdaSizes s = check_all(op, value_, spatial_shapes, level_start_index,
                                sampling_locations, attention_weights, &shapes, &starts);
  check_grad_output(op, grad_output, value_, s);
  const at::ScalarType acc_type = acc_dtype(value_.scalar_type());
  const at::Tensor value = value_.contiguous();
  const at::Tensor go = grad_output.contiguous();
  const at::Tensor loc = sampling_locations.to(acc_type).contiguous();
  const at::Tensor attn = attention_weights.to(acc_type).contiguous();
  at::Tensor grad_value = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attn = at::empty(attn.sizes(), attn.options());
  if (grad_attn.numel() > 0 && s.D > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, value.scalar_type(),
                                    "ms_deform_attn_backward_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      backward_kernel<scalar_t, acc_t>(s, go.data_ptr<scalar_t>(), value.data_ptr<scalar_t>(),
                                       shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
                                       loc.data_ptr<acc_t>(), attn.data_ptr<acc_t>(),
                                       grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
                                       grad_attn.data_ptr<acc_t>());
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  return {grad_value.to(value.scalar_type()), grad_loc.to(sampling_locations.scalar_type()),
          grad_attn.to(attention_weights.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("ms_deform_attn", TORCH_FN(ms_deform_attn_forward_cpu));
  m.impl("_ms_deform_attn_backward", TORCH_FN(ms_deform_attn_backward_cpu));
}

}  // namespace instseg
