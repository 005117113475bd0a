// Multi-scale deformable attention: the bilinear sampling shared by the CPU
// and CUDA kernels, forward and backward (plain arithmetic, host and device).
//
// Semantics of the reference op (Deformable DETR's ms_deform_attn, equal to
// grid_sample(bilinear, zeros, align_corners=False) per level):
//   * a location (x, y) in [0, 1] maps to pixel coordinates
//     w_im = x * W - 0.5, h_im = y * H - 0.5;
//   * it contributes only when -1 < h_im < H and -1 < w_im < W; NaN and inf
//     locations fail that test and contribute zero (and receive no gradient);
//   * the four neighbouring pixels are weighted bilinearly, pixels off the
//     level counting as zero.
// The pixel coordinates are computed with exact_math so that CPU and CUDA
// pick the same pixels and weights.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

#include "exact_math.h"

namespace instseg {
namespace msda_detail {

using exact_math::add_rn;
using exact_math::mul_rn;

// One bilinear sample: the top-left neighbour (h_low, w_low), possibly -1, the
// fractional offsets l* and their complements h*, and which of the four
// neighbours lie on the level, in the order (h_low, w_low), (h_low, w_low + 1),
// (h_low + 1, w_low), (h_low + 1, w_low + 1).
template <typename T>
struct Bilinear {
  int64_t h_low, w_low;
  T lh, lw, hh, hw;
  bool on[4];
  C10_HOST_DEVICE bool all_on() const { return on[0] && on[1] && on[2] && on[3]; }
  // Bilinear weight of neighbour i.
  C10_HOST_DEVICE T weight(int i) const {
    return i == 0 ? hh * hw : i == 1 ? hh * lw : i == 2 ? lh * hw : lh * lw;
  }
  // Pixel index (row-major within the level) of neighbour i; only for on[i].
  C10_HOST_DEVICE int64_t pixel(int i, int64_t W) const {
    return (h_low + (i >> 1)) * W + w_low + (i & 1);
  }
};

// Fills *b for the normalised location (x, y) on an H x W level; returns false
// when the location contributes nothing (see the header comment).
template <typename T>
C10_HOST_DEVICE inline bool bilinear(T x, T y, int64_t H, int64_t W, Bilinear<T>* b) {
  const T h_im = add_rn(mul_rn(y, static_cast<T>(H)), T(-0.5));
  const T w_im = add_rn(mul_rn(x, static_cast<T>(W)), T(-0.5));
  if (!(h_im > T(-1) && w_im > T(-1) && h_im < static_cast<T>(H) && w_im < static_cast<T>(W)))
    return false;
  const T hf = ::floor(h_im), wf = ::floor(w_im);
  b->h_low = static_cast<int64_t>(hf);
  b->w_low = static_cast<int64_t>(wf);
  b->lh = h_im - hf;
  b->lw = w_im - wf;
  b->hh = T(1) - b->lh;
  b->hw = T(1) - b->lw;
  const bool top = b->h_low >= 0, bottom = b->h_low + 1 < H;
  const bool left = b->w_low >= 0, right = b->w_low + 1 < W;
  b->on[0] = top && left;
  b->on[1] = top && right;
  b->on[2] = bottom && left;
  b->on[3] = bottom && right;
  return true;
}

// Gradients of one sample from the four dot products dot[i] = <grad_out, v_i>
// (v_i the value row of neighbour i, zero when off the level):
//   d out / d attention weight   = sum_i weight(i) * dot[i]
//   d out / d x  = W * attn * d(sum_i weight(i) * dot[i]) / d w_im, likewise y.
template <typename T>
C10_HOST_DEVICE inline void sample_grads(const Bilinear<T>& b, const T dot[4], T attn, int64_t H,
                                         int64_t W, T* grad_attn, T* grad_x, T* grad_y) {
  *grad_attn = b.hh * b.hw * dot[0] + b.hh * b.lw * dot[1] + b.lh * b.hw * dot[2] +
               b.lh * b.lw * dot[3];
  const T gh = b.hw * (dot[2] - dot[0]) + b.lw * (dot[3] - dot[1]);
  const T gw = b.hh * (dot[1] - dot[0]) + b.lh * (dot[3] - dot[2]);
  *grad_x = static_cast<T>(W) * attn * gw;
  *grad_y = static_cast<T>(H) * attn * gh;
}

// A level as a kernel sees it; `ok` is false for an inconsistent level (only
// possible where the host checks were skipped, e.g. during CUDA graph capture):
// such a level contributes nothing instead of being read out of bounds.
struct LevelView {
  int64_t H, W, start;
  bool ok;
};

C10_HOST_DEVICE inline LevelView level_view(const int64_t* shapes, const int64_t* starts,
                                            int64_t l, int64_t S) {
  LevelView v{shapes[2 * l], shapes[2 * l + 1], starts[l], false};
  v.ok = v.H >= 0 && v.W >= 0 && v.start >= 0 && v.start <= S &&
         (v.H == 0 || v.W <= (S - v.start) / v.H);
  if (!v.ok) v.H = v.W = v.start = 0;
  return v;
}

}  // namespace msda_detail
}  // namespace instseg
