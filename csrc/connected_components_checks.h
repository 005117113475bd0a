// Argument checks of the connected-components op, shared by its kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>

namespace instseg {

inline void check_connected_components_args(const at::Tensor& masks, int64_t connectivity) {
  TORCH_CHECK(masks.dim() == 3, "connected_components: masks must be a Tensor[N, H, W], got shape ",
              masks.sizes());
  TORCH_CHECK(masks.scalar_type() == at::kBool || c10::isIntegralType(masks.scalar_type(), false),
              "connected_components: masks must be bool or an integer type (nonzero = foreground), got ",
              masks.scalar_type(), "; threshold logits first");
  TORCH_CHECK(connectivity == 4 || connectivity == 8,
              "connected_components: connectivity must be 4 or 8, got ", connectivity);
  TORCH_CHECK(masks.size(1) * masks.size(2) < std::numeric_limits<int32_t>::max(),
              "connected_components: masks of ", masks.size(1), "x", masks.size(2),
              " pixels: at most 2^31 - 2 pixels per mask (int32 labels)");
}

}  // namespace instseg
