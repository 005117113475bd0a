// RoIAlign forward and backward on the CPU.
//
// Layout: NCHW and channels_last inputs are read in place (no copy); the output
// and the input gradient use the input's memory format. half/bfloat16
// accumulate in float.
//
// Each RoI's bilinear samples are separable: a sample's weight is a row weight
// times a column weight, and it is valid iff its row and its column are. The
// kernels build per-RoI tables of row samples and column samples once and use
// them in one of two evaluation orders:
//   * direct: four loads per sample (the textbook loop), for sparse sampling;
//   * separable: per bin row, blend the sampled feature rows over the RoI's
//     contiguous column span (vectorisable), then take the column samples from
//     that blended row. Used when the span is at most 4x the column samples.
// Both give the same value up to float rounding.
//
// Parallelism (at::parallel_for), all race-free:
//   forward  NCHW: tasks are (channel, block of RoIs), channel outermost so the
//            feature planes stay in cache; channels_last: (RoI, bin), vectorised
//            over channels.
//   backward NCHW: tasks are (image, channel); channels_last: (image, band of
//            rows), vectorised over channels. Each task owns its part of the
//            input gradient and visits the image's RoIs in index order, so the
//            result does not depend on the number of threads.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../roi_align_checks.h"
#include "../roi_align_common.h"

namespace instseg {
namespace {

using namespace roi_align_detail;

// Valid samples of one axis, grouped by bin.
template <typename T>
struct AxisTable {
  std::vector<AxisSample<T>> samples;
  std::vector<int64_t> offsets;  // samples of bin p: [offsets[p], offsets[p + 1])
  int64_t first = 0, last = -1;  // pixels touched by any sample: [first, last]

  void build(T start, T bin, int64_t pooled, int64_t grid, int64_t size) {
    samples.clear();
    offsets.assign(pooled + 1, 0);
    first = size;
    last = -1;
    for (int64_t p = 0; p < pooled; ++p) {
      int64_t lo, hi;
      sample_range(start, bin, p, grid, size, &lo, &hi);
      for (int64_t i = lo; i < hi; ++i) {
        AxisSample<T> s;
        if (axis_sample(sample_coord(start, bin, p, i, grid), size, &s)) {
          samples.push_back(s);
          first = std::min(first, s.lo);
          last = std::max(last, s.hi);
        }
      }
      offsets[p + 1] = static_cast<int64_t>(samples.size());
    }
  }
  const AxisSample<T>* begin(int64_t p) const { return samples.data() + offsets[p]; }
  const AxisSample<T>* end(int64_t p) const { return samples.data() + offsets[p + 1]; }
  int64_t span() const { return last - first + 1; }
};

template <typename T>
struct RoiTables {
  RoiGeometry<T> geom;
  AxisTable<T> ys, xs;
  bool separable = false;

  void build(const T* roi, T scale, int64_t ph, int64_t pw, int64_t sr, bool aligned,
             int64_t batch, int64_t height, int64_t width) {
    geom = roi_geometry(roi, scale, ph, pw, sr, aligned, batch);
    if (!geom.valid || height == 0 || width == 0) {
      geom.valid = false;
      return;
    }
    ys.build(geom.start_h, geom.bin_h, ph, geom.grid_h, height);
    xs.build(geom.start_w, geom.bin_w, pw, geom.grid_w, width);
    const int64_t nx = static_cast<int64_t>(xs.samples.size());
    separable = nx > 0 && xs.span() <= 4 * nx;
  }
};

// Geometry and sample tables of every RoI, built once (in parallel) and shared
// read-only by all tasks.
template <typename acc_t>
std::vector<RoiTables<acc_t>> build_all_tables(const acc_t* rois, int64_t K, acc_t scale,
                                                int64_t PH, int64_t PW, int64_t sr,
                                                bool aligned, int64_t N, int64_t H, int64_t W) {
  std::vector<RoiTables<acc_t>> tables(K);
  at::parallel_for(0, K, 16, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k)
      tables[k].build(rois + k * 5, scale, PH, PW, sr, aligned, N, H, W);
  });
  return tables;
}

bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Raises for a batch index outside [0, batch_size) (torchvision reads out of
// bounds there). Non-finite coordinates are not an error: such RoIs give zeros.
template <typename T>
void check_batch_indices(const T* rois, int64_t num_rois, int64_t batch_size) {
  for (int64_t k = 0; k < num_rois; ++k) {
    const T b = rois[k * 5];
    TORCH_CHECK(is_finite(b) && b > T(-1) && b < static_cast<T>(batch_size),
                "roi_align: rois[", k, ", 0] = ", b,
                " is not a valid batch index for an input with batch size ", batch_size);
  }
}

// ---------------------------------------------------------------------------
// Forward

// Pools one RoI from one H x W plane into o[PH * PW]. `row` is scratch of at
// least W elements.
template <typename scalar_t, typename acc_t>
void pool_plane(const RoiTables<acc_t>& t, const scalar_t* __restrict__ plane, int64_t W,
                int64_t PH, int64_t PW, scalar_t* __restrict__ o, acc_t* __restrict__ row) {
  const acc_t count = t.geom.count, inv_count = acc_t(1) / count;
  if (t.separable) {
    const int64_t x0 = t.xs.first, span = t.xs.span();
    for (int64_t ph = 0; ph < PH; ++ph) {
      std::fill(row, row + span, acc_t(0));
      for (auto* y = t.ys.begin(ph); y != t.ys.end(ph); ++y) {
        const scalar_t* __restrict__ r_lo = plane + y->lo * W + x0;
        const scalar_t* __restrict__ r_hi = plane + y->hi * W + x0;
        const acc_t w_lo = y->w_lo, w_hi = y->w_hi;
        for (int64_t j = 0; j < span; ++j) {
          row[j] += w_lo * static_cast<acc_t>(r_lo[j]) + w_hi * static_cast<acc_t>(r_hi[j]);
        }
      }
      for (int64_t pw = 0; pw < PW; ++pw) {
        acc_t sum = 0;
        for (auto* x = t.xs.begin(pw); x != t.xs.end(pw); ++x) {
          sum += x->w_lo * row[x->lo - x0] + x->w_hi * row[x->hi - x0];
        }
        o[ph * PW + pw] = static_cast<scalar_t>(sum * inv_count);
      }
    }
    return;
  }
  for (int64_t ph = 0; ph < PH; ++ph) {
    for (int64_t pw = 0; pw < PW; ++pw) {
      acc_t sum = 0;
      for (auto* y = t.ys.begin(ph); y != t.ys.end(ph); ++y) {
        const scalar_t* r_lo = plane + y->lo * W;
        const scalar_t* r_hi = plane + y->hi * W;
        for (auto* x = t.xs.begin(pw); x != t.xs.end(pw); ++x) {
          sum += y->w_lo * x->w_lo * static_cast<acc_t>(r_lo[x->lo]) +
              y->w_lo * x->w_hi * static_cast<acc_t>(r_lo[x->hi]) +
              y->w_hi * x->w_lo * static_cast<acc_t>(r_hi[x->lo]) +
              y->w_hi * x->w_hi * static_cast<acc_t>(r_hi[x->hi]);
        }
      }
      o[ph * PW + pw] = static_cast<scalar_t>(sum / count);
    }
  }
}

// Software prefetch of rows [y0, y1] x columns [x0, x1] of a plane.
template <typename scalar_t>
inline void prefetch_region(const scalar_t* plane, int64_t W, int64_t y0, int64_t y1, int64_t x0,
                            int64_t x1) {
#if defined(__GNUC__)
  constexpr int64_t kLine = 64 / sizeof(scalar_t);
  for (int64_t y = y0; y <= y1; ++y) {
    const scalar_t* r = plane + y * W;
    for (int64_t x = x0; x <= x1; x += kLine) __builtin_prefetch(r + x);
    __builtin_prefetch(r + x1);
  }
#endif
}

template <typename scalar_t, typename acc_t>
void forward_nchw(const scalar_t* in, const std::vector<RoiTables<acc_t>>& tables,
                  scalar_t* out, int64_t K, int64_t C, int64_t H, int64_t W, int64_t PH,
                  int64_t PW) {
  constexpr int64_t kRoiBlock = 64;
  const int64_t kblocks = (K + kRoiBlock - 1) / kRoiBlock;
  at::parallel_for(0, C * kblocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / kblocks, k0 = (task % kblocks) * kRoiBlock;
      const int64_t k1 = std::min(K, k0 + kRoiBlock);
      for (int64_t k = k0; k < k1; ++k) {
        // The next RoI's pixels are scattered over a plane that is mostly not
        // in cache yet: ask for them now, while this RoI is pooled.
        if (k + 1 < k1 && tables[k + 1].geom.valid) {
          const RoiTables<acc_t>& nt = tables[k + 1];
          prefetch_region(in + (nt.geom.batch * C + c) * H * W, W, nt.ys.first, nt.ys.last,
                          nt.xs.first, nt.xs.last);
        }
        const RoiTables<acc_t>& t = tables[k];
        scalar_t* o = out + (k * C + c) * PH * PW;
        if (!t.geom.valid) {
          std::fill(o, o + PH * PW, scalar_t(0));
          continue;
        }
        pool_plane(t, in + (t.geom.batch * C + c) * H * W, W, PH, PW, o, row.data());
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_channels_last(const scalar_t* in, const std::vector<RoiTables<acc_t>>& tables,
                           scalar_t* out, int64_t K, int64_t C, int64_t H, int64_t W,
                           int64_t PH, int64_t PW) {
  const int64_t grain = std::max<int64_t>(1, 1024 / std::max<int64_t>(C, 1));
  at::parallel_for(0, K * PH * PW, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(C);
    for (int64_t idx = begin; idx < end; ++idx) {
      const int64_t k = idx / (PH * PW), bin = idx % (PH * PW);
      const int64_t ph = bin / PW, pw = bin % PW;
      const RoiTables<acc_t>& t = tables[k];
      scalar_t* o = out + idx * C;  // output is [K, PH, PW, C] in memory
      if (!t.geom.valid) {
        std::fill(o, o + C, scalar_t(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      acc_t* __restrict__ a = acc.data();
      const scalar_t* img = in + t.geom.batch * H * W * C;
      for (auto* y = t.ys.begin(ph); y != t.ys.end(ph); ++y) {
        for (auto* x = t.xs.begin(pw); x != t.xs.end(pw); ++x) {
          const acc_t w1 = y->w_lo * x->w_lo, w2 = y->w_lo * x->w_hi;
          const acc_t w3 = y->w_hi * x->w_lo, w4 = y->w_hi * x->w_hi;
          const scalar_t* __restrict__ p1 = img + (y->lo * W + x->lo) * C;
          const scalar_t* __restrict__ p2 = img + (y->lo * W + x->hi) * C;
          const scalar_t* __restrict__ p3 = img + (y->hi * W + x->lo) * C;
          const scalar_t* __restrict__ p4 = img + (y->hi * W + x->hi) * C;
          for (int64_t c = 0; c < C; ++c) {
            a[c] += w1 * static_cast<acc_t>(p1[c]) + w2 * static_cast<acc_t>(p2[c]) +
                w3 * static_cast<acc_t>(p3[c]) + w4 * static_cast<acc_t>(p4[c]);
          }
        }
      }
      const acc_t count = t.geom.count;
      for (int64_t c = 0; c < C; ++c) o[c] = static_cast<scalar_t>(a[c] / count);
    }
  });
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input_, const at::Tensor& rois_,
                                 double spatial_scale, int64_t pooled_height,
                                 int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                 bool /*deterministic*/) {
  check_roi_align_args(input_, rois_, pooled_height, pooled_width);
  TORCH_CHECK(input_.device().is_cpu(), "roi_align: CPU kernel got a ", input_.device(), " input");
  const bool cl = use_channels_last(input_);
  // A no-op for the usual NCHW-contiguous or channels_last input.
  const at::Tensor input = cl ? input_ : input_.contiguous();
  const at::Tensor rois = rois_.to(acc_dtype(input.scalar_type())).contiguous();
  const int64_t N = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const int64_t K = rois.size(0);
  at::Tensor out = at::empty({K, C, pooled_height, pooled_width},
                             input.options().memory_format(cl ? at::MemoryFormat::ChannelsLast
                                                              : at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "roi_align_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* r = rois.data_ptr<acc_t>();
    check_batch_indices(r, K, N);
    if (out.numel() == 0) return;
    const auto tables = build_all_tables(r, K, static_cast<acc_t>(spatial_scale), pooled_height,
                                         pooled_width, sampling_ratio, aligned, N, H, W);
    if (cl) {
      forward_channels_last(input.data_ptr<scalar_t>(), tables, out.data_ptr<scalar_t>(), K, C,
                            H, W, pooled_height, pooled_width);
    } else {
      forward_nchw(input.data_ptr<scalar_t>(), tables, out.data_ptr<scalar_t>(), K, C, H, W,
                   pooled_height, pooled_width);
    }
  });
  return out;
}

// ---------------------------------------------------------------------------
// Backward

// Strided view of the output gradient.
template <typename scalar_t>
struct GradView {
  const scalar_t* data;
  int64_t s0, s1, s2, s3;
  const scalar_t* at(int64_t k, int64_t c, int64_t ph, int64_t pw) const {
    return data + k * s0 + c * s1 + ph * s2 + pw * s3;
  }
};

// Adds the gradient of one RoI, channel plane `c`, into acc (an H x W plane).
// `col` is scratch of at least W elements.
template <typename scalar_t, typename acc_t>
void scatter_plane(const RoiTables<acc_t>& t, const GradView<scalar_t>& g, int64_t k, int64_t c,
                   int64_t W, int64_t PH, int64_t PW, acc_t* __restrict__ acc,
                   acc_t* __restrict__ col) {
  const acc_t count = t.geom.count;
  if (t.separable) {
    // Adjoint of the separable forward: column samples into a row buffer,
    // then the buffer into the sampled rows.
    const int64_t x0 = t.xs.first, span = t.xs.span();
    for (int64_t ph = 0; ph < PH; ++ph) {
      if (t.ys.begin(ph) == t.ys.end(ph)) continue;
      std::fill(col, col + span, acc_t(0));
      for (int64_t pw = 0; pw < PW; ++pw) {
        const acc_t gv = static_cast<acc_t>(*g.at(k, c, ph, pw)) / count;
        for (auto* x = t.xs.begin(pw); x != t.xs.end(pw); ++x) {
          col[x->lo - x0] += x->w_lo * gv;
          col[x->hi - x0] += x->w_hi * gv;
        }
      }
      for (auto* y = t.ys.begin(ph); y != t.ys.end(ph); ++y) {
        acc_t* __restrict__ r_lo = acc + y->lo * W + x0;
        const acc_t w_lo = y->w_lo, w_hi = y->w_hi;
        for (int64_t j = 0; j < span; ++j) r_lo[j] += w_lo * col[j];
        acc_t* __restrict__ r_hi = acc + y->hi * W + x0;
        for (int64_t j = 0; j < span; ++j) r_hi[j] += w_hi * col[j];
      }
    }
    return;
  }
  for (int64_t ph = 0; ph < PH; ++ph) {
    for (int64_t pw = 0; pw < PW; ++pw) {
      const acc_t gv = static_cast<acc_t>(*g.at(k, c, ph, pw)) / count;
      for (auto* y = t.ys.begin(ph); y != t.ys.end(ph); ++y) {
        acc_t* r_lo = acc + y->lo * W;
        acc_t* r_hi = acc + y->hi * W;
        for (auto* x = t.xs.begin(pw); x != t.xs.end(pw); ++x) {
          r_lo[x->lo] += y->w_lo * x->w_lo * gv;
          r_lo[x->hi] += y->w_lo * x->w_hi * gv;
          r_hi[x->lo] += y->w_hi * x->w_lo * gv;
          r_hi[x->hi] += y->w_hi * x->w_hi * gv;
        }
      }
    }
  }
}

template <typename scalar_t, typename acc_t>
void backward_nchw(const GradView<scalar_t>& g, const std::vector<RoiTables<acc_t>>& tables,
                   const std::vector<std::vector<int64_t>>& per_image, scalar_t* gin, int64_t N,
                   int64_t C, int64_t H, int64_t W, int64_t PH, int64_t PW) {
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
  const int64_t HW = H * W;
  at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kDirect ? 0 : HW);
    std::vector<acc_t> col(W);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / C, c = task % C;
      scalar_t* dst = gin + task * HW;
      acc_t* acc = kDirect ? reinterpret_cast<acc_t*>(dst) : scratch.data();
      std::fill(acc, acc + HW, acc_t(0));
      for (int64_t k : per_image[n]) scatter_plane(tables[k], g, k, c, W, PH, PW, acc, col.data());
      if (!kDirect) {
        for (int64_t i = 0; i < HW; ++i) dst[i] = static_cast<scalar_t>(scratch[i]);
      }
    }
  });
}

// channels_last: a task owns a band of rows of one image, all channels, and
// adds only the samples whose rows fall in its band.
template <typename scalar_t, typename acc_t>
void backward_channels_last(const GradView<scalar_t>& g,
                            const std::vector<RoiTables<acc_t>>& tables,
                            const std::vector<std::vector<int64_t>>& per_image, scalar_t* gin,
                            int64_t N, int64_t C, int64_t H, int64_t W, int64_t PH, int64_t PW) {
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
  constexpr int64_t kBand = 8;
  const int64_t bands = (H + kBand - 1) / kBand;
  at::parallel_for(0, N * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kDirect ? 0 : kBand * W * C);
    std::vector<acc_t> gbin(C);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / bands, y0 = (task % bands) * kBand;
      const int64_t y1 = std::min(H, y0 + kBand);
      scalar_t* dst = gin + (n * H + y0) * W * C;  // rows [y0, y1) of image n
      // acc[((y - y0) * W + x) * C + c]
      acc_t* acc = kDirect ? reinterpret_cast<acc_t*>(dst) : scratch.data();
      std::fill(acc, acc + (y1 - y0) * W * C, acc_t(0));
      for (int64_t k : per_image[n]) {
        const RoiTables<acc_t>& t = tables[k];
        if (t.ys.last < y0 || t.ys.first >= y1) continue;
        const acc_t count = t.geom.count;
        for (int64_t ph = 0; ph < PH; ++ph) {
          bool touches = false;
          for (auto* y = t.ys.begin(ph); y != t.ys.end(ph); ++y)
            touches |= (y->lo >= y0 && y->lo < y1) || (y->hi >= y0 && y->hi < y1);
          if (!touches) continue;
          for (int64_t pw = 0; pw < PW; ++pw) {
            const scalar_t* gp = g.at(k, 0, ph, pw);
            for (int64_t c = 0; c < C; ++c) gbin[c] = static_cast<acc_t>(gp[c * g.s1]) / count;
            const acc_t* __restrict__ gb = gbin.data();
            for (auto* y = t.ys.begin(ph); y != t.ys.end(ph); ++y) {
              const bool lo_in = y->lo >= y0 && y->lo < y1, hi_in = y->hi >= y0 && y->hi < y1;
              if (!lo_in && !hi_in) continue;
              for (auto* x = t.xs.begin(pw); x != t.xs.end(pw); ++x) {
                if (lo_in) {
                  acc_t* __restrict__ a1 = acc + ((y->lo - y0) * W + x->lo) * C;
                  const acc_t w1 = y->w_lo * x->w_lo;
                  for (int64_t c = 0; c < C; ++c) a1[c] += w1 * gb[c];
                  acc_t* __restrict__ a2 = acc + ((y->lo - y0) * W + x->hi) * C;
                  const acc_t w2 = y->w_lo * x->w_hi;
                  for (int64_t c = 0; c < C; ++c) a2[c] += w2 * gb[c];
                }
                if (hi_in) {
                  acc_t* __restrict__ a3 = acc + ((y->hi - y0) * W + x->lo) * C;
                  const acc_t w3 = y->w_hi * x->w_lo;
                  for (int64_t c = 0; c < C; ++c) a3[c] += w3 * gb[c];
                  acc_t* __restrict__ a4 = acc + ((y->hi - y0) * W + x->hi) * C;
                  const acc_t w4 = y->w_hi * x->w_hi;
                  for (int64_t c = 0; c < C; ++c) a4[c] += w4 * gb[c];
                }
              }
            }
          }
        }
      }
      if (!kDirect) {
        const int64_t n_el = (y1 - y0) * W * C;
        for (int64_t i = 0; i < n_el; ++i) dst[i] = static_cast<scalar_t>(scratch[i]);
      }
    }
  });
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois_,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio,
                                  bool aligned, bool channels_last, bool /*deterministic*/) {
  check_roi_align_backward_args(grad, rois_, pooled_height, pooled_width, batch_size, channels,
                                height, width);
  TORCH_CHECK(grad.device().is_cpu(), "_roi_align_backward: CPU kernel got a ", grad.device(),
              " grad");
  const at::Tensor rois = rois_.to(acc_dtype(grad.scalar_type())).contiguous();
  const auto fmt = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const int64_t K = rois.size(0);
  at::Tensor gin = at::empty({batch_size, channels, height, width}, grad.options().memory_format(fmt));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "roi_align_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* r = rois.data_ptr<acc_t>();
    check_batch_indices(r, K, batch_size);
    if (gin.numel() == 0) return;
    if (K == 0) {
      gin.zero_();
      return;
    }
    const auto tables = build_all_tables(r, K, static_cast<acc_t>(spatial_scale), pooled_height,
                                         pooled_width, sampling_ratio, aligned, batch_size,
                                         height, width);
    std::vector<std::vector<int64_t>> per_image(batch_size);  // RoIs per image, in index order
    for (int64_t k = 0; k < K; ++k)
      if (tables[k].geom.valid) per_image[tables[k].geom.batch].push_back(k);
    const GradView<scalar_t> g{grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
                               grad.stride(2), grad.stride(3)};
    if (channels_last) {
      backward_channels_last(g, tables, per_image, gin.data_ptr<scalar_t>(), batch_size,
                             channels, height, width, pooled_height, pooled_width);
    } else {
      backward_nchw(g, tables, per_image, gin.data_ptr<scalar_t>(), batch_size, channels, height,
                    width, pooled_height, pooled_width);
    }
  });
  return gin;
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cpu));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cpu));
}

}  // namespace instseg
