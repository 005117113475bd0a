// Shared RoIAlign geometry for the CPU and CUDA kernels.
//
// Everything here is plain arithmetic usable on host and device. The
// semantics follow torchvision's RoIAlign (see README "Ops"):
//   * box corners are scaled by spatial_scale; aligned=True shifts them by -0.5;
//   * without `aligned`, RoIs narrower/shorter than one pixel are forced to 1;
//   * each output bin averages grid_h x grid_w bilinear samples, where the grid
//     is `sampling_ratio` or, when sampling_ratio <= 0, ceil(roi_size / pooled);
//   * a sample outside [-1, size] contributes zero (but still counts).
// What torchvision does not define, and we do:
//   * RoIs with a non-finite coordinate, or an invalid batch index, produce
//     zeros (the CPU path and the CUDA path outside graph capture raise for a bad
//     batch index before any kernel runs);
//   * only samples that can be valid are visited, so huge boxes cannot hang.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

#include "exact_math.h"

namespace instseg {
namespace roi_align_detail {

// The exact arithmetic (csrc/exact_math.h), unqualified in this namespace.
using exact_math::add_rn;
using exact_math::is_finite;
using exact_math::mul_rn;
using exact_math::unit_roundoff;

template <typename T>
struct RoiGeometry {
  int64_t batch;   // image index into the feature map
  T start_h;       // first row coordinate of the RoI (feature pixels)
  T start_w;
  T bin_h;         // bin height
  T bin_w;
  int64_t grid_h;  // samples per bin along y
  int64_t grid_w;
  T count;         // grid_h * grid_w, at least 1 (the averaging divisor)
  bool valid;      // false: the RoI produces zeros and receives no gradient
};

// Largest sampling grid we ever build; only reached by absurd, finite boxes,
// and only the samples inside the feature map are visited anyway.
constexpr int64_t kMaxGrid = int64_t(1) << 40;

template <typename T>
C10_HOST_DEVICE inline int64_t grid_size(T roi_size, int64_t pooled, int64_t sampling_ratio) {
  if (sampling_ratio > 0) return sampling_ratio;
  T g = ::ceil(roi_size / static_cast<T>(pooled));
  if (!(g > T(0))) return 0;  // also catches NaN
  if (g > static_cast<T>(kMaxGrid)) return kMaxGrid;
  return static_cast<int64_t>(g);
}

// `roi` points at 5 values (batch index, x1, y1, x2, y2) already converted to T.
template <typename T>
C10_HOST_DEVICE inline RoiGeometry<T> roi_geometry(
    const T* roi, T spatial_scale, int64_t pooled_h, int64_t pooled_w,
    int64_t sampling_ratio, bool aligned, int64_t batch_size) {
  RoiGeometry<T> g;
  g.valid = false;
  g.batch = 0;
  g.start_h = g.start_w = g.bin_h = g.bin_w = T(0);
  g.grid_h = g.grid_w = 0;
  g.count = T(1);
  const T b = roi[0];
  if (!is_finite(b) || !(b > T(-1)) || !(b < static_cast<T>(batch_size))) return g;
  g.batch = static_cast<int64_t>(b);  // truncation, like a C cast of the index
  const T offset = aligned ? T(0.5) : T(0);
  const T x1 = add_rn(mul_rn(roi[1], spatial_scale), -offset);
  const T y1 = add_rn(mul_rn(roi[2], spatial_scale), -offset);
  const T x2 = add_rn(mul_rn(roi[3], spatial_scale), -offset);
  const T y2 = add_rn(mul_rn(roi[4], spatial_scale), -offset);
  T roi_w = x2 - x1;
  T roi_h = y2 - y1;
  if (!aligned) {
    roi_w = roi_w > T(1) ? roi_w : T(1);
    roi_h = roi_h > T(1) ? roi_h : T(1);
  }
  const T bin_h = roi_h / static_cast<T>(pooled_h);
  const T bin_w = roi_w / static_cast<T>(pooled_w);
  // Any non-finite corner (before or after scaling) makes the RoI empty, also
  // where clamping the size to 1 would otherwise hide it.
  if (!is_finite(x1) || !is_finite(y1) || !is_finite(x2) || !is_finite(y2) ||
      !is_finite(bin_h) || !is_finite(bin_w))
    return g;
  g.start_h = y1;
  g.start_w = x1;
  g.bin_h = bin_h;
  g.bin_w = bin_w;
  g.grid_h = grid_size(roi_h, pooled_h, sampling_ratio);
  g.grid_w = grid_size(roi_w, pooled_w, sampling_ratio);
  const T cnt = static_cast<T>(g.grid_h) * static_cast<T>(g.grid_w);
  g.count = cnt > T(1) ? cnt : T(1);
  g.valid = true;
  return g;
}

// Coordinate of sample `i` of bin `p` along one axis, evaluated exactly as
// torchvision writes it so that results agree bit for bit where they can.
template <typename T>
C10_HOST_DEVICE inline T sample_coord(T start, T bin, int64_t p, int64_t i, int64_t grid) {
  return add_rn(add_rn(start, mul_rn(static_cast<T>(p), bin)),
                mul_rn(static_cast<T>(static_cast<float>(i) + 0.5f), bin) / static_cast<T>(grid));
}

// Range [*lo, *hi) of sample indices of bin `p` that may fall in [-1, size].
// Computed in double with a margin that covers the rounding of the sample
// coordinates in T (large for huge boxes); callers still test each sample
// exactly, so the range only prunes samples that are certainly outside.
template <typename T>
C10_HOST_DEVICE inline void sample_range(
    T start, T bin, int64_t p, int64_t grid, int64_t size, int64_t* lo, int64_t* hi) {
  *lo = 0;
  *hi = grid;
  if (grid <= 4) return;
  const double base = static_cast<double>(start) + static_cast<double>(p) * static_cast<double>(bin);
  const double step = static_cast<double>(bin) / static_cast<double>(grid);
  if (step == 0.0) return;
  double a = (-1.0 - base) / step - 0.5;
  double b = (static_cast<double>(size) - base) / step - 0.5;
  if (a > b) { const double t = a; a = b; b = t; }
  // Coordinates in T can be off by a few roundoffs of |start| + |p * bin| + |bin|.
  const double err = 8.0 * unit_roundoff<T>() *
      (::fabs(static_cast<double>(start)) + ::fabs(base) + ::fabs(static_cast<double>(bin))) /
      ::fabs(step);
  a = ::floor(a - err) - 2.0;
  b = ::ceil(b + err) + 3.0;
  if (a > static_cast<double>(*lo)) *lo = a >= static_cast<double>(grid) ? grid : static_cast<int64_t>(a);
  if (b < static_cast<double>(*hi)) *hi = b <= 0.0 ? 0 : static_cast<int64_t>(b);
  if (*hi - *lo <= 8) return;
  // For huge boxes the margin leaves millions of candidates. Sample coordinates
  // are monotone in the index (non-decreasing for bin > 0, non-increasing for
  // bin < 0), so the ones in [-1, size] form one run: bisect to its ends, so
  // that callers visit only samples on the map (the per-sample test stays).
  const bool inc = !(sample_coord(start, bin, p, *hi - 1, grid) < sample_coord(start, bin, p, *lo, grid));
  const T below = T(-1), above = static_cast<T>(size);
  int64_t l = *lo, h = *hi;
  while (l < h) {  // first index not before the map
    const int64_t m = l + (h - l) / 2;
    const T v = sample_coord(start, bin, p, m, grid);
    if (inc ? v < below : v > above) l = m + 1; else h = m;
  }
  const int64_t first = l;
  h = *hi;
  while (l < h) {  // first index past the map
    const int64_t m = l + (h - l) / 2;
    const T v = sample_coord(start, bin, p, m, grid);
    if (inc ? v > above : v < below) h = m; else l = m + 1;
  }
  *lo = first;
  *hi = l;
}

// One axis of a bilinear sample: the two neighbouring pixels and their weights.
template <typename T>
struct AxisSample {
  int64_t lo;
  int64_t hi;
  T w_lo;  // weight of `lo` (torchvision's hy / hx)
  T w_hi;  // weight of `hi` (torchvision's ly / lx)
};

// Returns false when the coordinate lies outside [-1, size] (sample is zero).
// `size` must be >= 1.
template <typename T>
C10_HOST_DEVICE inline bool axis_sample(T v, int64_t size, AxisSample<T>* s) {
  if (v < T(-1) || v > static_cast<T>(size)) return false;
  if (v <= T(0)) v = T(0);
  int64_t lo = static_cast<int64_t>(v);
  int64_t hi;
  if (lo >= size - 1) {
    lo = hi = size - 1;
    v = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = v - static_cast<T>(lo);
  s->lo = lo;
  s->hi = hi;
  s->w_lo = T(1) - l;
  s->w_hi = l;
  return true;
}

// Pixel rows (or columns) [*first, *last] that samples of this RoI can touch
// along one axis; empty when *first > *last. Conservative.
template <typename T>
C10_HOST_DEVICE inline void touched_span(T start, T bin, int64_t pooled, int64_t size,
                                         int64_t* first, int64_t* last) {
  double a = static_cast<double>(start);
  double b = a + static_cast<double>(bin) * static_cast<double>(pooled);
  if (a > b) { const double t = a; a = b; b = t; }
  // Sample coordinates are computed in T: allow for their rounding.
  const double err = 8.0 * unit_roundoff<T>() * (::fabs(a) + ::fabs(b));
  a = ::floor(a - err) - 1.0;
  b = ::ceil(b + err) + 1.0;
  *first = a < 0.0 ? 0 : (a > static_cast<double>(size) ? size : static_cast<int64_t>(a));
  *last = b > static_cast<double>(size - 1) ? size - 1 : (b < -1.0 ? -1 : static_cast<int64_t>(b));
}

}  // namespace roi_align_detail
}  // namespace instseg
