// Argument checks shared by the CPU and CUDA RoIAlign kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace instseg {

inline void check_roi_align_args(const at::Tensor& input, const at::Tensor& rois,
                                 int64_t pooled_height, int64_t pooled_width) {
  TORCH_CHECK(input.dim() == 4, "roi_align: input must be a 4-D tensor [N, C, H, W], got ",
              input.dim(), " dimensions");
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "roi_align: rois must be a Tensor[K, 5] (batch index, x1, y1, x2, y2), got shape ",
              rois.sizes());
  TORCH_CHECK(c10::isFloatingType(input.scalar_type()),
              "roi_align: input must be a floating tensor, got ", input.scalar_type());
  TORCH_CHECK(c10::isFloatingType(rois.scalar_type()),
              "roi_align: rois must be a floating tensor, got ", rois.scalar_type());
  TORCH_CHECK(input.device() == rois.device(), "roi_align: input is on ", input.device(),
              " but rois are on ", rois.device());
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0,
              "roi_align: output_size must be positive, got (", pooled_height, ", ",
              pooled_width, ")");
}

inline void check_roi_align_backward_args(const at::Tensor& grad, const at::Tensor& rois,
                                          int64_t pooled_height, int64_t pooled_width,
                                          int64_t batch_size, int64_t channels, int64_t height,
                                          int64_t width) {
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == rois.size(0) && grad.size(1) == channels &&
                  grad.size(2) == pooled_height && grad.size(3) == pooled_width,
              "_roi_align_backward: grad must have shape [K, C, pooled_h, pooled_w] = [",
              rois.size(0), ", ", channels, ", ", pooled_height, ", ", pooled_width, "], got ",
              grad.sizes());
  TORCH_CHECK(rois.dim() == 2 && rois.size(1) == 5,
              "_roi_align_backward: rois must be a Tensor[K, 5], got shape ", rois.sizes());
  TORCH_CHECK(c10::isFloatingType(grad.scalar_type()) && c10::isFloatingType(rois.scalar_type()),
              "_roi_align_backward: grad and rois must be floating tensors");
  TORCH_CHECK(grad.device() == rois.device(), "_roi_align_backward: grad is on ", grad.device(),
              " but rois are on ", rois.device());
  TORCH_CHECK(batch_size >= 0 && channels >= 0 && height >= 0 && width >= 0,
              "_roi_align_backward: negative input size");
  TORCH_CHECK(pooled_height > 0 && pooled_width > 0,
              "_roi_align_backward: output_size must be positive");
}

}  // namespace instseg
