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

#include "../feature_levels.h"
#include "../roi_align_checks.h"
#include "../roi_align_common.h"

namespace instseg {
namespace {

// Parallel loops hand each thread at least this many output bins (one channel of one bin each):
// below that, waking the other threads costs more than the work, and on a busy machine a
// parallel region can wait a whole scheduler time slice for a descheduled thread.
constexpr int64_t kMinBinsPerThread = 8192;

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
  int64_t level = 0;  // feature-map level the RoI pools from
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
// read-only by all tasks. RoI k pools from level levels[k] (level 0 when
// `levels` is null); levels are validated by the caller.
template <typename acc_t>
std::vector<RoiTables<acc_t>> build_all_tables(const acc_t* rois, const int64_t* levels,
                                                int64_t K, const std::vector<Level>& lv,
                                                int64_t PH, int64_t PW, int64_t sr,
                                                bool aligned, int64_t N) {
  std::vector<RoiTables<acc_t>> tables(K);
  at::parallel_for(0, K, 16, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      const int64_t l = levels ? levels[k] : 0;
      tables[k].level = l;
      tables[k].build(rois + k * 5, static_cast<acc_t>(lv[l].scale), PH, PW, sr, aligned, N,
                      lv[l].H, lv[l].W);
    }
  });
  return tables;
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

// NCHW forward. Tasks are (channel, block of RoIs) with the channel outermost,
// so a thread keeps pooling from the same feature planes while they are in
// cache instead of streaming a new plane for every RoI.
template <typename scalar_t, typename acc_t>
void forward_nchw(const std::vector<const scalar_t*>& in, const std::vector<Level>& lv,
                  const std::vector<RoiTables<acc_t>>& tables, scalar_t* out, int64_t K,
                  int64_t C, int64_t PH, int64_t PW) {
  constexpr int64_t kRoiBlock = 64;
  const int64_t kblocks = (K + kRoiBlock - 1) / kRoiBlock;
  int64_t max_w = 0;
  for (const Level& l : lv) max_w = std::max(max_w, l.W);
  // At least kMinBinsPerThread output bins per thread: tiny calls stay on the calling thread.
  const int64_t task_bins = std::max<int64_t>(1, std::min(K, kRoiBlock) * PH * PW);
  const int64_t grain = std::max<int64_t>(1, kMinBinsPerThread / task_bins);
  at::parallel_for(0, C * kblocks, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> row(max_w);
    auto plane_of = [&](const RoiTables<acc_t>& t, int64_t c) {
      const Level& l = lv[t.level];
      return in[t.level] + (t.geom.batch * C + c) * l.H * l.W;
    };
    for (int64_t task = begin; task < end; ++task) {
      const int64_t c = task / kblocks, k0 = (task % kblocks) * kRoiBlock;
      const int64_t k1 = std::min(K, k0 + kRoiBlock);
      for (int64_t k = k0; k < k1; ++k) {
        // The next RoI's pixels are scattered over a plane that is mostly not
        // in cache yet: ask for them now, while this RoI is pooled.
        if (k + 1 < k1 && tables[k + 1].geom.valid) {
          const RoiTables<acc_t>& nt = tables[k + 1];
          prefetch_region(plane_of(nt, c), lv[nt.level].W, nt.ys.first, nt.ys.last, nt.xs.first,
                          nt.xs.last);
        }
        const RoiTables<acc_t>& t = tables[k];
        scalar_t* o = out + (k * C + c) * PH * PW;
        if (!t.geom.valid) {
          std::fill(o, o + PH * PW, scalar_t(0));
          continue;
        }
        pool_plane(t, plane_of(t, c), lv[t.level].W, PH, PW, o, row.data());
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
void forward_channels_last(const std::vector<const scalar_t*>& in, const std::vector<Level>& lv,
                           const std::vector<RoiTables<acc_t>>& tables, scalar_t* out,
                           int64_t K, int64_t C, int64_t PH, int64_t PW) {
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
      const int64_t W = lv[t.level].W;
      const scalar_t* img = in[t.level] + t.geom.batch * lv[t.level].H * W * C;
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

// Shared by roi_align (one level) and multilevel_roi_align. `feats` all have
// the layout given by `cl` and are contiguous in it; `rois` are in acc dtype;
// `levels` (int64, validated) may be undefined for one level.
at::Tensor forward_impl(const std::vector<at::Tensor>& feats, const at::Tensor& rois,
                        const at::Tensor& levels, const std::vector<Level>& lv,
                        int64_t pooled_height, int64_t pooled_width, int64_t sampling_ratio,
                        bool aligned, bool cl) {
  const at::Tensor& f0 = feats[0];
  const int64_t N = f0.size(0), C = f0.size(1), K = rois.size(0);
  at::Tensor out =
      at::empty({K, C, pooled_height, pooled_width}, f0.options().memory_format(memory_format(cl)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, f0.scalar_type(),
                                  "roi_align_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* r = rois.data_ptr<acc_t>();
    check_batch_indices(r, K, N);
    if (out.numel() == 0) return;
    const auto tables = build_all_tables(r, levels.defined() ? levels.data_ptr<int64_t>() : nullptr,
                                         K, lv, pooled_height, pooled_width, sampling_ratio,
                                         aligned, N);
    std::vector<const scalar_t*> in;
    for (const at::Tensor& f : feats) in.push_back(f.data_ptr<scalar_t>());
    if (cl) {
      forward_channels_last(in, lv, tables, out.data_ptr<scalar_t>(), K, C, pooled_height,
                            pooled_width);
    } else {
      forward_nchw(in, lv, tables, out.data_ptr<scalar_t>(), K, C, pooled_height, pooled_width);
    }
  });
  return out;
}

at::Tensor roi_align_forward_cpu(const at::Tensor& input, const at::Tensor& rois,
                                 double spatial_scale, int64_t pooled_height,
                                 int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                 bool /*deterministic*/) {
  check_roi_align_args(input, rois, pooled_height, pooled_width);
  check_scales_and_sampling("roi_align", {spatial_scale}, sampling_ratio);
  TORCH_CHECK(input.device().is_cpu(), "roi_align: CPU kernel got a ", input.device(), " input");
  const bool cl = use_channels_last(input);
  // A no-op for the usual NCHW-contiguous or channels_last input.
  const at::Tensor feat = cl ? input : input.contiguous();
  return forward_impl({feat}, rois.to(acc_dtype(input.scalar_type())).contiguous(), at::Tensor(),
                      {Level{feat.size(2), feat.size(3), spatial_scale}}, pooled_height,
                      pooled_width, sampling_ratio, aligned, cl);
}

// Raises unless every level index is in [0, num_levels).
void check_levels(const at::Tensor& levels, int64_t num_levels) {
  const int64_t* l = levels.data_ptr<int64_t>();
  for (int64_t k = 0; k < levels.numel(); ++k) {
    TORCH_CHECK(l[k] >= 0 && l[k] < num_levels, "multilevel_roi_align: levels[", k, "] = ", l[k],
                " is not a valid level index for ", num_levels, " feature maps");
  }
}

at::Tensor multilevel_roi_align_forward_cpu(at::TensorList features, const at::Tensor& rois,
                                            const at::Tensor& levels_,
                                            at::ArrayRef<double> spatial_scales,
                                            int64_t pooled_height, int64_t pooled_width,
                                            int64_t sampling_ratio, bool aligned,
                                            bool /*deterministic*/) {
  check_multilevel_args(features, rois, levels_, spatial_scales, pooled_height, pooled_width);
  check_scales_and_sampling("multilevel_roi_align", spatial_scales, sampling_ratio);
  TORCH_CHECK(features[0].device().is_cpu(), "multilevel_roi_align: CPU kernel got a ",
              features[0].device(), " input");
  const bool cl = use_channels_last(features[0]);
  const std::vector<at::Tensor> feats = same_layout(features, cl);
  const at::Tensor levels = levels_.contiguous();
  check_levels(levels, static_cast<int64_t>(features.size()));
  return forward_impl(feats, rois.to(acc_dtype(feats[0].scalar_type())).contiguous(), levels,
                      levels_of(feats, spatial_scales), pooled_height, pooled_width,
                      sampling_ratio, aligned, cl);
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

// Input-gradient planes per level.
template <typename scalar_t>
struct GradInputs {
  std::vector<scalar_t*> data;  // one per level
  int64_t N, C;
};

// NCHW: a task owns one (level, image, channel) plane.
template <typename scalar_t, typename acc_t>
void backward_nchw(const GradView<scalar_t>& g, const std::vector<RoiTables<acc_t>>& tables,
                   const std::vector<std::vector<int64_t>>& per_image, const GradInputs<scalar_t>& gin,
                   const std::vector<Level>& lv, int64_t PH, int64_t PW) {
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
  const int64_t N = gin.N, C = gin.C, L = static_cast<int64_t>(lv.size());
  int64_t max_hw = 0, max_w = 0;
  for (const Level& l : lv) {
    max_hw = std::max(max_hw, l.H * l.W);
    max_w = std::max(max_w, l.W);
  }
  // A task's work: its plane, and the bins of its image's RoIs on that level.
  int64_t max_bins = 0;
  for (const auto& ks : per_image)
    max_bins = std::max<int64_t>(max_bins, static_cast<int64_t>(ks.size()) * PH * PW);
  const int64_t grain = std::max<int64_t>(1, kMinBinsPerThread / std::max<int64_t>(1, max_bins + max_hw / 16));
  at::parallel_for(0, L * N * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kDirect ? 0 : max_hw);
    std::vector<acc_t> col(max_w);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t l = task / (N * C), n = (task / C) % N, c = task % C;
      const int64_t HW = lv[l].H * lv[l].W;
      scalar_t* dst = gin.data[l] + (n * C + c) * HW;
      acc_t* acc = kDirect ? reinterpret_cast<acc_t*>(dst) : scratch.data();
      std::fill(acc, acc + HW, acc_t(0));
      for (int64_t k : per_image[l * N + n])
        scatter_plane(tables[k], g, k, c, lv[l].W, PH, PW, acc, col.data());
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
                            const std::vector<std::vector<int64_t>>& per_image,
                            const GradInputs<scalar_t>& gin, const std::vector<Level>& lv,
                            int64_t PH, int64_t PW) {
  constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
  constexpr int64_t kBand = 8;
  const int64_t N = gin.N, C = gin.C;
  // Tasks: (level, image, first row of the band).
  struct Task {
    int64_t l, n, y0;
  };
  std::vector<Task> tasks;
  int64_t max_w = 0;
  for (int64_t l = 0; l < static_cast<int64_t>(lv.size()); ++l) {
    max_w = std::max(max_w, lv[l].W);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t y0 = 0; y0 < lv[l].H; y0 += kBand) tasks.push_back(Task{l, n, y0});
  }
  int64_t rois = 0;
  for (const auto& ks : per_image) rois += static_cast<int64_t>(ks.size());
  const int64_t ntasks = std::max<int64_t>(1, static_cast<int64_t>(tasks.size()));
  const int64_t per_task = std::max<int64_t>(1, rois * PH * PW * C / ntasks);
  const int64_t grain = std::max<int64_t>(1, kMinBinsPerThread / (per_task + kBand * max_w * C / 16));
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(kDirect ? 0 : kBand * max_w * C);
    std::vector<acc_t> gbin(C);
    for (int64_t ti = begin; ti < end; ++ti) {
      const int64_t l = tasks[ti].l, n = tasks[ti].n, y0 = tasks[ti].y0;
      const int64_t H = lv[l].H, W = lv[l].W;
      const int64_t y1 = std::min(H, y0 + kBand);
      scalar_t* dst = gin.data[l] + (n * H + y0) * W * C;  // rows [y0, y1) of image n
      // acc[((y - y0) * W + x) * C + c]
      acc_t* acc = kDirect ? reinterpret_cast<acc_t*>(dst) : scratch.data();
      std::fill(acc, acc + (y1 - y0) * W * C, acc_t(0));
      for (int64_t k : per_image[l * N + n]) {
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
                // Adds w * gradient to all channels of pixel (row, col).
                auto add = [&](int64_t row, int64_t col, acc_t w) {
                  acc_t* __restrict__ a = acc + ((row - y0) * W + col) * C;
                  for (int64_t c = 0; c < C; ++c) a[c] += w * gb[c];
                };
                if (lo_in) {
                  add(y->lo, x->lo, y->w_lo * x->w_lo);
                  add(y->lo, x->hi, y->w_lo * x->w_hi);
                }
                if (hi_in) {
                  add(y->hi, x->lo, y->w_hi * x->w_lo);
                  add(y->hi, x->hi, y->w_hi * x->w_hi);
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

// Shared by both backward ops: one input gradient per level (sizes[l] = (H, W)).
std::vector<at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& rois,
                                      const at::Tensor& levels, const std::vector<Level>& lv,
                                      int64_t N, int64_t C, int64_t pooled_height,
                                      int64_t pooled_width, int64_t sampling_ratio, bool aligned,
                                      bool channels_last) {
  const auto fmt = memory_format(channels_last);
  const int64_t K = rois.size(0);
  std::vector<at::Tensor> gins;
  for (const Level& l : lv) gins.push_back(at::empty({N, C, l.H, l.W}, grad.options().memory_format(fmt)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(),
                                  "roi_align_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* r = rois.data_ptr<acc_t>();
    check_batch_indices(r, K, N);
    if (K == 0 || C == 0 || N == 0) {
      for (at::Tensor& t : gins) t.zero_();
      return;
    }
    const auto tables = build_all_tables(r, levels.defined() ? levels.data_ptr<int64_t>() : nullptr,
                                         K, lv, pooled_height, pooled_width, sampling_ratio,
                                         aligned, N);
    // RoIs per (level, image), in index order.
    std::vector<std::vector<int64_t>> per_image(lv.size() * N);
    for (int64_t k = 0; k < K; ++k)
      if (tables[k].geom.valid) per_image[tables[k].level * N + tables[k].geom.batch].push_back(k);
    const GradView<scalar_t> g{grad.data_ptr<scalar_t>(), grad.stride(0), grad.stride(1),
                               grad.stride(2), grad.stride(3)};
    GradInputs<scalar_t> gi{{}, N, C};
    for (at::Tensor& t : gins) gi.data.push_back(t.data_ptr<scalar_t>());
    if (channels_last) {
      backward_channels_last(g, tables, per_image, gi, lv, pooled_height, pooled_width);
    } else {
      backward_nchw(g, tables, per_image, gi, lv, pooled_height, pooled_width);
    }
  });
  return gins;
}

at::Tensor roi_align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois,
                                  double spatial_scale, int64_t pooled_height,
                                  int64_t pooled_width, int64_t batch_size, int64_t channels,
                                  int64_t height, int64_t width, int64_t sampling_ratio,
                                  bool aligned, bool channels_last, bool /*deterministic*/) {
  check_roi_align_backward_args(grad, rois, pooled_height, pooled_width, batch_size, channels,
                                height, width);
  check_scales_and_sampling("_roi_align_backward", {spatial_scale}, sampling_ratio);
  TORCH_CHECK(grad.device().is_cpu(), "_roi_align_backward: CPU kernel got a ", grad.device(),
              " grad");
  return backward_impl(grad, rois.to(acc_dtype(grad.scalar_type())).contiguous(), at::Tensor(),
                       {Level{height, width, spatial_scale}}, batch_size, channels,
                       pooled_height, pooled_width, sampling_ratio, aligned, channels_last)[0];
}

std::vector<at::Tensor> multilevel_roi_align_backward_cpu(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels_,
    at::ArrayRef<double> spatial_scales, int64_t pooled_height, int64_t pooled_width,
    at::IntArrayRef level_sizes, int64_t sampling_ratio, bool aligned, bool channels_last,
    bool /*deterministic*/) {
  const std::vector<Level> lv =
      check_multilevel_backward_args(grad, rois, levels_, spatial_scales, pooled_height,
                                     pooled_width, level_sizes);
  check_scales_and_sampling("_multilevel_roi_align_backward", spatial_scales, sampling_ratio);
  TORCH_CHECK(grad.device().is_cpu(), "_multilevel_roi_align_backward: CPU kernel got a ",
              grad.device(), " grad");
  const at::Tensor levels = levels_.contiguous();
  check_levels(levels, static_cast<int64_t>(lv.size()));
  return backward_impl(grad, rois.to(acc_dtype(grad.scalar_type())).contiguous(), levels, lv,
                       level_sizes[0], level_sizes[1], pooled_height, pooled_width,
                       sampling_ratio, aligned, channels_last);
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("roi_align", TORCH_FN(roi_align_forward_cpu));
  m.impl("_roi_align_backward", TORCH_FN(roi_align_backward_cpu));
  m.impl("multilevel_roi_align", TORCH_FN(multilevel_roi_align_forward_cpu));
  m.impl("_multilevel_roi_align_backward", TORCH_FN(multilevel_roi_align_backward_cpu));
}

}  // namespace instseg
