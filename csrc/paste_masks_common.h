// Shared mask-pasting geometry for the CPU and CUDA kernels (plain arithmetic,
// usable on host and device). Two modes:
//
// torchvision (paste_masks_in_image): pad the M x M mask by `pad` zeros to
//   P x P, expand the box about its centre by P / M, truncate the corners to
//   integers (b0, b1, b2, b3), bilinearly resize the padded mask to
//   (b3 - b1 + 1) x (b2 - b0 + 1) with align_corners=False, clip to the image.
// aligned (detectron2's grid_sample pasting): pixel (y, x) samples the mask at
//   the position of its centre (x + 0.5, y + 0.5) inside the sub-pixel box,
//   bilinearly with zeros outside the mask (align_corners=False).
//
// Every pixel outside a mask's Region is 0. A box with a non-finite coordinate
// has an empty Region. All float arithmetic is correctly rounded and never
// contracted into FMAs, so CPU and CUDA give the same bits.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

#include "exact_math.h"

namespace instseg {
namespace paste_detail {

using exact_math::add_rn;
using exact_math::is_finite;
using exact_math::mul_rn;

// Pixels [y0, y1) x [x0, x1) of the image that a mask may write (clipped).
struct Region {
  int64_t x0, y0, x1, y1;
  C10_HOST_DEVICE bool empty() const { return x0 >= x1 || y0 >= y1; }
  C10_HOST_DEVICE int64_t area() const { return empty() ? 0 : (x1 - x0) * (y1 - y0); }
};

// Float -> integer without undefined behaviour for huge values (truncates
// toward zero, as torchvision's .to(int32) does).
C10_HOST_DEVICE inline int64_t to_int(double v) {
  constexpr double kLimit = 4.0e15;
  if (!(v == v)) return 0;  // NaN: callers reject non-finite values first; a safety net
  return static_cast<int64_t>(v < -kLimit ? -kLimit : (v > kLimit ? kLimit : v));
}

C10_HOST_DEVICE inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

C10_HOST_DEVICE inline bool box_finite(const float* box) {
  return is_finite(box[0]) && is_finite(box[1]) && is_finite(box[2]) && is_finite(box[3]);
}

// ---------------------------------------------------------------- torchvision
struct TvPaste {
  int64_t bx, by;  // integer box origin (may lie outside the image)
  float sx, sy;    // resize scales: padded size / integer box size
  int64_t M, pad;
  Region region;
};

C10_HOST_DEVICE inline TvPaste tv_geometry(const float* box, int64_t M, int64_t pad, int64_t H,
                                           int64_t W) {
  TvPaste g;
  g.M = M;
  g.pad = pad;
  g.region = Region{0, 0, 0, 0};
  g.bx = g.by = 0;
  g.sx = g.sy = 1.f;
  if (!box_finite(box)) return g;
  const int64_t P = M + 2 * pad;
  const float scale = static_cast<float>(static_cast<double>(P) / static_cast<double>(M));
  const float w_half = mul_rn(mul_rn(add_rn(box[2], -box[0]), 0.5f), scale);
  const float h_half = mul_rn(mul_rn(add_rn(box[3], -box[1]), 0.5f), scale);
  const float x_c = mul_rn(add_rn(box[2], box[0]), 0.5f);
  const float y_c = mul_rn(add_rn(box[3], box[1]), 0.5f);
  const float e0 = add_rn(x_c, -w_half), e1 = add_rn(y_c, -h_half);
  const float e2 = add_rn(x_c, w_half), e3 = add_rn(y_c, h_half);
  // Finite corners near the float range can expand to inf or NaN (e.g. inf - inf): nothing.
  if (!(is_finite(e0) && is_finite(e1) && is_finite(e2) && is_finite(e3))) return g;
  const int64_t b0 = to_int(e0), b1 = to_int(e1), b2 = to_int(e2), b3 = to_int(e3);
  const int64_t w = b2 - b0 + 1 > 1 ? b2 - b0 + 1 : 1;
  const int64_t h = b3 - b1 + 1 > 1 ? b3 - b1 + 1 : 1;
  g.bx = b0;
  g.by = b1;
  g.sx = static_cast<float>(P) / static_cast<float>(w);
  g.sy = static_cast<float>(P) / static_cast<float>(h);
  // torchvision pastes rows [b1, b3 + 1) and columns [b0, b2 + 1), clipped.
  g.region = Region{clamp64(b0, 0, W), clamp64(b1, 0, H), clamp64(b2 + 1, 0, W), clamp64(b3 + 1, 0, H)};
  return g;
}

// One bilinear axis: source taps i0, i1 (indices into the padded mask, which
// may fall in the zero border) and the weight l1 of i1. An invalid tap (a
// pixel whose sample lies wholly outside the mask) gives 0.
struct Tap {
  int64_t i0, i1;
  float l1;
  bool valid;
};

// torchvision: the resize's align_corners=False source of output index `dst`,
// negative sources clamped to 0.
C10_HOST_DEVICE inline Tap tv_tap(float scale, int64_t dst, int64_t P) {
  float src = add_rn(mul_rn(scale, static_cast<float>(dst) + 0.5f), -0.5f);
  if (src < 0.f) src = 0.f;
  Tap t;
  t.i0 = static_cast<int64_t>(src);
  if (t.i0 > P - 1) t.i0 = P - 1;  // never reached by valid scales; a guard for the reads
  t.i1 = t.i0 + (t.i0 < P - 1 ? 1 : 0);
  t.l1 = add_rn(src, -static_cast<float>(t.i0));
  t.valid = true;
  return t;
}

// Value of the padded mask at (r, c), zero in the padding and beyond.
template <typename scalar_t>
C10_HOST_DEVICE inline float padded_at(const scalar_t* mask, int64_t M, int64_t pad, int64_t r,
                                       int64_t c) {
  r -= pad;
  c -= pad;
  return (r >= 0 && r < M && c >= 0 && c < M) ? static_cast<float>(mask[r * M + c]) : 0.f;
}

C10_HOST_DEVICE inline float lerp2(float l1, float a, float b) {
  return add_rn(mul_rn(add_rn(1.f, -l1), a), mul_rn(l1, b));
}

// The bilinear value, blended along y first (per column), then along x. The
// CPU kernel evaluates the same expression with the y-blend of a whole row
// cached, so both devices give identical bits.
template <typename scalar_t>
C10_HOST_DEVICE inline float column_value(const scalar_t* mask, int64_t M, int64_t pad, const Tap& ty,
                                          int64_t c) {
  return lerp2(ty.l1, padded_at(mask, M, pad, ty.i0, c), padded_at(mask, M, pad, ty.i1, c));
}

template <typename scalar_t>
C10_HOST_DEVICE inline float pixel_value(const scalar_t* mask, int64_t M, int64_t pad, const Tap& ty,
                                         const Tap& tx) {
  if (!ty.valid || !tx.valid) return 0.f;
  return lerp2(tx.l1, column_value(mask, M, pad, ty, tx.i0), column_value(mask, M, pad, ty, tx.i1));
}

// -------------------------------------------------------------------- aligned
struct AlignedPaste {
  float x0, y0, x1, y1;  // the sub-pixel box
  int64_t M;
  Region region;
};

C10_HOST_DEVICE inline AlignedPaste aligned_geometry(const float* box, int64_t M, int64_t H,
                                                     int64_t W) {
  AlignedPaste g;
  g.x0 = box[0];
  g.y0 = box[1];
  g.x1 = box[2];
  g.y1 = box[3];
  g.M = M;
  g.region = Region{0, 0, 0, 0};
  if (!box_finite(box) || !(g.x1 > g.x0) || !(g.y1 > g.y0)) return g;
  // A pixel can be nonzero only if its centre lies within one mask cell of the
  // box (bilinear support); one more pixel on each side absorbs rounding. This is
  // grid_sample over the whole image; detectron2's own CPU path only paints
  // [floor(x0) - 1, ceil(x1) + 1) and can miss part of the (< 0.5) fringe of
  // boxes wider than a few mask cells per pixel.
  const double cw = (static_cast<double>(g.x1) - g.x0) / M, ch = (static_cast<double>(g.y1) - g.y0) / M;
  g.region.x0 = clamp64(to_int(::floor(g.x0 - cw)) - 1, 0, W);
  g.region.x1 = clamp64(to_int(::ceil(g.x1 + cw)) + 1, 0, W);
  g.region.y0 = clamp64(to_int(::floor(g.y0 - ch)) - 1, 0, H);
  g.region.y1 = clamp64(to_int(::ceil(g.y1 + ch)) + 1, 0, H);
  return g;
}

// Tap of pixel p along one axis of the box [lo, hi]: grid_sample's
// unnormalisation of the normalised pixel centre (align_corners=False).
C10_HOST_DEVICE inline float aligned_floor(int64_t p, float lo, float hi, int64_t M, float* coord_out) {
  const float g = add_rn(mul_rn(add_rn(static_cast<float>(p) + 0.5f, -lo) / add_rn(hi, -lo), 2.f), -1.f);
  const float coord = add_rn(mul_rn(add_rn(g, 1.f), static_cast<float>(M)), -1.f) / 2.f;
  *coord_out = coord;
  return ::floor(coord);
}

C10_HOST_DEVICE inline Tap aligned_tap(int64_t p, float lo, float hi, int64_t M) {
  float coord;
  const float f = aligned_floor(p, lo, hi, M, &coord);
  Tap t;
  // Both taps outside the mask (also for huge or non-finite coordinates): 0.
  t.valid = f >= -1.f && f <= static_cast<float>(M);
  t.i0 = t.valid ? static_cast<int64_t>(f) : 0;
  t.i1 = t.i0 + 1;
  t.l1 = t.valid ? add_rn(coord, -f) : 0.f;
  return t;
}

// ------------------------------------------------------------------- backward
// Pasting is linear in the mask and separable: a region pixel (y, x) is
//   lerp2(tx.l1, lerp2(ty.l1, m[ty.i0][tx.i0], m[ty.i1][tx.i0]), lerp2(ty.l1, m[ty.i0][tx.i1], m[ty.i1][tx.i1]))
// (padded indices; taps outside the mask read 0), so with the incoming gradient G
// of the region, the gradient of padded cell (r, c) is
//   grad[r][c] = sum_y [ty.i0 == r] (1 - ty.l1) S_y(c) + [ty.i1 == r] ty.l1 S_y(c)
//   S_y(c)     = sum_x [tx.i0 == c] (1 - tx.l1) G[y][x] + [tx.i1 == c] tx.l1 G[y][x]
// over the pixels with valid taps (both terms when the two taps coincide). Both
// kernels add these terms in the same order -- rows y ascending, within a row
// columns x ascending, tap i0's term before tap i1's -- with add_tap_terms, so
// the CPU kernel (which scatters each row) and the CUDA kernel (which gathers
// per cell) give the same bits.

// acc + [t.i0 == cell] (1 - t.l1) v + [t.i1 == cell] t.l1 v, each product rounded
// and added in that order (acc_t: float, or double for float64 masks).
template <typename acc_t>
C10_HOST_DEVICE inline acc_t add_tap_terms(acc_t acc, const Tap& t, int64_t cell, acc_t v) {
  if (t.i0 == cell) acc = add_rn(acc, mul_rn(static_cast<acc_t>(add_rn(1.f, -t.l1)), v));
  if (t.i1 == cell) acc = add_rn(acc, mul_rn(static_cast<acc_t>(t.l1), v));
  return acc;
}

// One axis (rows or columns) of a mask's geometry: the tap of image pixel p, as
// the forward computes it, and a key that is non-decreasing in p (tap i0 of a
// valid tap; below every cell before the mask and above every cell after it).
// Only pixels with key(p) in {cell - 1, cell} can have a tap on `cell`, so they
// form one run of pixels, found by binary search (first_pixel).
struct PasteAxis {
  bool aligned;
  float a, b;      // torchvision: a = the resize scale; aligned: the box's [a, b]
  int64_t origin;  // torchvision: the integer box origin
  int64_t P;       // padded mask size (M when aligned)
  int64_t M;

  C10_HOST_DEVICE Tap tap(int64_t p) const {
    return aligned ? aligned_tap(p, a, b, M) : tv_tap(a, p - origin, P);
  }

  C10_HOST_DEVICE int64_t key(int64_t p) const {
    if (!aligned) return tv_tap(a, p - origin, P).i0;
    float coord;
    const float f = aligned_floor(p, a, b, M, &coord);
    // The same validity test as aligned_tap (coordinates are never NaN for finite boxes with b > a).
    if (f >= -1.f && f <= static_cast<float>(M)) return static_cast<int64_t>(f);
    return f < -1.f ? -2 : M + 1;
  }
};

C10_HOST_DEVICE inline PasteAxis tv_axis(float scale, int64_t origin, int64_t M, int64_t pad) {
  return PasteAxis{false, scale, 0.f, origin, M + 2 * pad, M};
}

C10_HOST_DEVICE inline PasteAxis aligned_axis(float lo, float hi, int64_t M) {
  return PasteAxis{true, lo, hi, 0, M, M};
}

// The first pixel p in [lo, hi) with axis.key(p) >= k, or hi if there is none.
C10_HOST_DEVICE inline int64_t first_pixel(const PasteAxis& axis, int64_t lo, int64_t hi, int64_t k) {
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (axis.key(mid) >= k) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}

}  // namespace paste_detail
}  // namespace instseg
