// Mask pasting on the CPU: one task per mask (at::parallel_for), work
// proportional to the mask's clipped box area plus the zero fill of the output.
// A box with a non-finite coordinate pastes nothing.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace instseg {
namespace {

// Clamp before converting a float coordinate to an integer (no UB for huge boxes).
inline int64_t to_int(double v) {
  constexpr double kLimit = 4.0e15;
  return static_cast<int64_t>(std::max(-kLimit, std::min(kLimit, v)));
}

// One bilinear axis: the two source indices and the weight of the second.
struct Tap {
  int64_t i0, i1;
  float l1;
};

// Writes value(y, x) for the pixels of rows [y0, y1) x columns [x0, x1).
template <typename out_t, typename F>
void fill_region(out_t* canvas, int64_t W, int64_t y0, int64_t y1, int64_t x0, int64_t x1,
                 std::optional<double> threshold, F&& value) {
  for (int64_t y = y0; y < y1; ++y) {
    out_t* row = canvas + y * W;
    for (int64_t x = x0; x < x1; ++x) {
      const float v = value(y, x);
      if constexpr (std::is_same<out_t, bool>::value) {
        row[x] = v >= static_cast<float>(*threshold);
      } else {
        row[x] = static_cast<out_t>(v);
      }
    }
  }
}

// torchvision semantics. mask: M x M; box: 4 floats.
template <typename scalar_t, typename out_t>
void paste_torchvision(const scalar_t* mask, int64_t M, const float* box, int64_t pad,
                       out_t* canvas, int64_t H, int64_t W, std::optional<double> threshold) {
  for (int j = 0; j < 4; ++j)
    if (!std::isfinite(box[j])) return;
  const int64_t P = M + 2 * pad;
  const float scale = static_cast<float>(static_cast<double>(P) / static_cast<double>(M));
  const float w_half = (box[2] - box[0]) * 0.5f * scale, h_half = (box[3] - box[1]) * 0.5f * scale;
  const float x_c = (box[2] + box[0]) * 0.5f, y_c = (box[3] + box[1]) * 0.5f;
  const int64_t b0 = to_int(x_c - w_half), b1 = to_int(y_c - h_half);
  const int64_t b2 = to_int(x_c + w_half), b3 = to_int(y_c + h_half);
  const int64_t w = std::max<int64_t>(b2 - b0 + 1, 1), h = std::max<int64_t>(b3 - b1 + 1, 1);
  const int64_t x0 = std::max<int64_t>(b0, 0), x1 = std::min<int64_t>(b2 + 1, W);
  const int64_t y0 = std::max<int64_t>(b1, 0), y1 = std::min<int64_t>(b3 + 1, H);
  if (x0 >= x1 || y0 >= y1) return;
  // Bilinear resize of the padded mask (P x P) to h x w, align_corners=False.
  const float sy = static_cast<float>(P) / static_cast<float>(h);
  const float sx = static_cast<float>(P) / static_cast<float>(w);
  auto tap = [&](float s, int64_t dst) {
    float src = s * (static_cast<float>(dst) + 0.5f) - 0.5f;
    if (src < 0) src = 0;
    Tap t;
    t.i0 = static_cast<int64_t>(src);
    t.i1 = t.i0 + (t.i0 < P - 1 ? 1 : 0);
    t.l1 = src - static_cast<float>(t.i0);
    return t;
  };
  std::vector<Tap> cols(x1 - x0);
  for (int64_t x = x0; x < x1; ++x) cols[x - x0] = tap(sx, x - b0);
  auto at = [&](int64_t r, int64_t c) -> float {  // padded mask
    r -= pad;
    c -= pad;
    return (r >= 0 && r < M && c >= 0 && c < M) ? static_cast<float>(mask[r * M + c]) : 0.f;
  };
  int64_t cur_y = -1;
  Tap ty{0, 0, 0.f};
  fill_region(canvas, W, y0, y1, x0, x1, threshold, [&](int64_t y, int64_t x) {
    if (y != cur_y) {
      ty = tap(sy, y - b1);
      cur_y = y;
    }
    const Tap& tx = cols[x - x0];
    const float l0y = 1.f - ty.l1, l0x = 1.f - tx.l1;
    return l0y * (l0x * at(ty.i0, tx.i0) + tx.l1 * at(ty.i0, tx.i1)) +
        ty.l1 * (l0x * at(ty.i1, tx.i0) + tx.l1 * at(ty.i1, tx.i1));
  });
}

// detectron2 semantics (grid_sample, align_corners=False, zeros outside).
template <typename scalar_t, typename out_t>
void paste_aligned(const scalar_t* mask, int64_t M, const float* box, out_t* canvas, int64_t H,
                   int64_t W, std::optional<double> threshold) {
  for (int j = 0; j < 4; ++j)
    if (!std::isfinite(box[j])) return;
  const float bx0 = box[0], by0 = box[1], bx1 = box[2], by1 = box[3];
  if (!(bx1 > bx0) || !(by1 > by0)) return;
  // Pixels whose sample can touch the mask: centre within half a mask cell outside the box.
  const double cw = (static_cast<double>(bx1) - bx0) / M, ch = (static_cast<double>(by1) - by0) / M;
  const int64_t x0 = std::max<int64_t>(0, to_int(std::floor(bx0 - cw)) - 1);
  const int64_t x1 = std::min<int64_t>(W, to_int(std::ceil(bx1 + cw)) + 1);
  const int64_t y0 = std::max<int64_t>(0, to_int(std::floor(by0 - ch)) - 1);
  const int64_t y1 = std::min<int64_t>(H, to_int(std::ceil(by1 + ch)) + 1);
  if (x0 >= x1 || y0 >= y1) return;
  auto coord = [&](int64_t p, float lo, float hi) {  // pixel -> mask coordinate
    const float g = (static_cast<float>(p) + 0.5f - lo) / (hi - lo) * 2.f - 1.f;
    return ((g + 1.f) * static_cast<float>(M) - 1.f) / 2.f;
  };
  auto at = [&](int64_t r, int64_t c) -> float {
    return (r >= 0 && r < M && c >= 0 && c < M) ? static_cast<float>(mask[r * M + c]) : 0.f;
  };
  fill_region(canvas, W, y0, y1, x0, x1, threshold, [&](int64_t y, int64_t x) {
    const float iy = coord(y, by0, by1), ix = coord(x, bx0, bx1);
    const float fy = std::floor(iy), fx = std::floor(ix);
    const int64_t r0 = static_cast<int64_t>(fy), c0 = static_cast<int64_t>(fx);
    const float ly = iy - fy, lx = ix - fx;
    return (1.f - ly) * ((1.f - lx) * at(r0, c0) + lx * at(r0, c0 + 1)) +
        ly * ((1.f - lx) * at(r0 + 1, c0) + lx * at(r0 + 1, c0 + 1));
  });
}

at::Tensor paste_masks_cpu(const at::Tensor& masks_, const at::Tensor& boxes_, int64_t H, int64_t W,
                           int64_t padding, std::optional<double> threshold, bool aligned) {
  TORCH_CHECK(masks_.dim() == 3 && masks_.size(1) == masks_.size(2),
              "paste_masks: masks must be a Tensor[N, M, M], got shape ", masks_.sizes());
  TORCH_CHECK(masks_.size(1) >= 1, "paste_masks: masks must be at least 1x1");
  TORCH_CHECK(boxes_.dim() == 2 && boxes_.size(1) == 4 && boxes_.size(0) == masks_.size(0),
              "paste_masks: boxes must be a Tensor[N, 4] with one box per mask, got shape ",
              boxes_.sizes(), " for ", masks_.size(0), " masks");
  TORCH_CHECK(c10::isFloatingType(masks_.scalar_type()) && c10::isFloatingType(boxes_.scalar_type()),
              "paste_masks: masks and boxes must be floating tensors");
  TORCH_CHECK(masks_.device() == boxes_.device(), "paste_masks: masks are on ", masks_.device(),
              " but boxes are on ", boxes_.device());
  TORCH_CHECK(H >= 0 && W >= 0, "paste_masks: negative image size (", H, ", ", W, ")");
  TORCH_CHECK(padding >= 0, "paste_masks: padding must be >= 0, got ", padding);
  TORCH_CHECK(!threshold || !std::isnan(*threshold), "paste_masks: threshold is NaN");
  TORCH_CHECK(masks_.device().is_cpu(), "paste_masks: CPU kernel got ", masks_.device(), " masks");
  const at::Tensor masks = masks_.contiguous();
  const at::Tensor boxes = boxes_.to(at::kFloat).contiguous();
  const int64_t N = masks.size(0), M = masks.size(1);
  at::Tensor out = at::zeros({N, H, W}, masks.options().dtype(threshold ? at::kBool : masks.scalar_type()));
  // Pixels no mask reaches have probability 0: with a threshold <= 0 they pass.
  if (threshold && *threshold <= 0.0) out.fill_(true);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks.scalar_type(), "paste_masks_cpu", [&] {
    const scalar_t* m = masks.data_ptr<scalar_t>();
    const float* b = boxes.data_ptr<float>();
    auto run = [&](auto* canvas) {
      at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
        for (int64_t n = begin; n < end; ++n) {
          if (aligned) {
            paste_aligned(m + n * M * M, M, b + n * 4, canvas + n * H * W, H, W, threshold);
          } else {
            paste_torchvision(m + n * M * M, M, b + n * 4, padding, canvas + n * H * W, H, W, threshold);
          }
        }
      });
    };
    if (threshold) run(out.data_ptr<bool>());
    else run(out.data_ptr<scalar_t>());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("paste_masks", TORCH_FN(paste_masks_cpu));
}

}  // namespace instseg
