// Argument checks of the binary-mask ops (csrc/masks.cpp), shared by their kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace instseg {

inline void check_binary_masks(const at::Tensor& masks, const char* op) {
  TORCH_CHECK(masks.dim() == 3, op, ": masks must be a Tensor[N, H, W], got shape ", masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || c10::isIntegralType(masks.scalar_type(), false), op,
              ": masks must be bool or an integer type (nonzero = foreground), got ", masks.scalar_type(),
              "; threshold logits first");
  TORCH_CHECK(masks.size(1) * masks.size(2) < std::numeric_limits<int32_t>::max(), op, ": masks of ",
              masks.size(1), "x", masks.size(2), " pixels: at most 2^31 - 2 pixels per mask");
}

inline void check_mask_logits(const at::Tensor& logits, double mask_threshold, double offset) {
  const char* op = "stability_score_and_boxes";
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be a Tensor[N, H, W], got shape ", logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(std::isfinite(mask_threshold) && std::isfinite(offset), op,
              ": mask_threshold and offset must be finite, got ", mask_threshold, " and ", offset);
  TORCH_CHECK(logits.size(1) * logits.size(2) < std::numeric_limits<int32_t>::max(), op, ": masks of ",
              logits.size(1), "x", logits.size(2), " pixels: at most 2^31 - 2 pixels per mask");
}

}  // namespace instseg
