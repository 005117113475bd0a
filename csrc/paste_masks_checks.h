// Argument checks shared by the CPU and CUDA mask-pasting kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>
#include <optional>

namespace instseg {

constexpr int64_t kMaxPadding = 1 << 16;

inline void check_paste_args(const at::Tensor& masks, const at::Tensor& boxes, int64_t H, int64_t W,
                             int64_t padding, std::optional<double> threshold) {
  TORCH_CHECK(masks.dim() == 3 && masks.size(1) == masks.size(2),
              "paste_masks: masks must be a Tensor[N, M, M], got shape ", masks.sizes());
  TORCH_CHECK(masks.size(1) >= 1, "paste_masks: masks must be at least 1x1");
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4 && boxes.size(0) == masks.size(0),
              "paste_masks: boxes must be a Tensor[N, 4] with one box per mask, got shape ",
              boxes.sizes(), " for ", masks.size(0), " masks");
  TORCH_CHECK(c10::isFloatingType(masks.scalar_type()) && c10::isFloatingType(boxes.scalar_type()),
              "paste_masks: masks and boxes must be floating tensors, got ", masks.scalar_type(),
              " and ", boxes.scalar_type());
  TORCH_CHECK(masks.device() == boxes.device(), "paste_masks: masks are on ", masks.device(),
              " but boxes are on ", boxes.device());
  TORCH_CHECK(H >= 0 && W >= 0, "paste_masks: negative image size (", H, ", ", W, ")");
  TORCH_CHECK(padding >= 0 && padding <= kMaxPadding, "paste_masks: padding must be in [0, ", kMaxPadding,
              "], got ", padding);
  TORCH_CHECK(!threshold || !std::isnan(*threshold), "paste_masks: threshold is NaN");
}

// The threshold as the kernels compare it: value (float32) >= threshold rounded
// to float32, saturating beyond the float range.
inline float threshold_as_float(double t) {
  constexpr double kMax = 3.4028234663852886e38;
  if (t > kMax) return std::numeric_limits<float>::infinity();
  if (t < -kMax) return -std::numeric_limits<float>::infinity();
  return static_cast<float>(t);
}

}  // namespace instseg
