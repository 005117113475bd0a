// Argument checks shared by the CPU and CUDA RoIAlign kernels (single- and
// multi-level; the level helpers are in feature_levels.h).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "feature_levels.h"
#include "tensor_utils.h"

#include <cmath>
#include <limits>
#include <vector>

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

// An explicit sampling grid beyond this would take sampling_ratio^2 samples per
// bin (a hang, not a result); adaptive grids (<= 0) are bounded by the map.
constexpr int64_t kMaxSamplingRatio = 1024;

// Spatial scales must be finite numbers that float32 can hold (the kernels
// convert them to the input's precision).
inline void check_scales_and_sampling(const char* op, at::ArrayRef<double> spatial_scales,
                                      int64_t sampling_ratio) {
  TORCH_CHECK(sampling_ratio <= kMaxSamplingRatio, op, ": sampling_ratio must be <= ",
              kMaxSamplingRatio, " (or <= 0 for the adaptive grid), got ", sampling_ratio);
  for (double s : spatial_scales)
    TORCH_CHECK(std::isfinite(s) && std::fabs(s) <= std::numeric_limits<float>::max(), op,
                ": spatial_scale must be finite and within the float32 range, got ", s);
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

inline void check_levels_tensor(const char* op, const at::Tensor& levels, const at::Tensor& rois) {
  TORCH_CHECK(levels.dim() == 1 && levels.size(0) == rois.size(0), op,
              ": levels must be a Tensor[K] with one level per RoI, got shape ", levels.sizes(),
              " for ", rois.size(0), " RoIs");
  TORCH_CHECK(levels.scalar_type() == at::kLong, op, ": levels must be int64, got ",
              levels.scalar_type());
  TORCH_CHECK(levels.device() == rois.device(), op, ": levels are on ", levels.device(),
              " but rois are on ", rois.device());
}

inline void check_multilevel_args(at::TensorList features, const at::Tensor& rois,
                                  const at::Tensor& levels, at::ArrayRef<double> scales,
                                  int64_t pooled_height, int64_t pooled_width) {
  const int64_t L = static_cast<int64_t>(features.size());
  TORCH_CHECK(L >= 1 && L <= kMaxLevels, "multilevel_roi_align: expected 1 to ", kMaxLevels,
              " feature maps, got ", L);
  TORCH_CHECK(static_cast<int64_t>(scales.size()) == L, "multilevel_roi_align: got ", L,
              " feature maps but ", scales.size(), " spatial_scales");
  check_roi_align_args(features[0], rois, pooled_height, pooled_width);
  for (int64_t l = 1; l < L; ++l) {
    const at::Tensor& f = features[l];
    TORCH_CHECK(f.dim() == 4, "multilevel_roi_align: features[", l, "] must be 4-D, got ",
                f.dim(), " dimensions");
    TORCH_CHECK(f.size(0) == features[0].size(0) && f.size(1) == features[0].size(1),
                "multilevel_roi_align: all levels must agree on N and C; features[0] is ",
                features[0].sizes(), ", features[", l, "] is ", f.sizes());
    TORCH_CHECK(f.scalar_type() == features[0].scalar_type(),
                "multilevel_roi_align: all levels must have one dtype; features[0] is ",
                features[0].scalar_type(), ", features[", l, "] is ", f.scalar_type());
    TORCH_CHECK(f.device() == features[0].device(),
                "multilevel_roi_align: all levels must be on one device; features[0] is on ",
                features[0].device(), ", features[", l, "] on ", f.device());
  }
  check_levels_tensor("multilevel_roi_align", levels, rois);
}

// level_sizes = (N, C, H0, W0, H1, W1, ...). Returns the levels.
inline std::vector<Level> check_multilevel_backward_args(
    const at::Tensor& grad, const at::Tensor& rois, const at::Tensor& levels,
    at::ArrayRef<double> scales, int64_t pooled_height, int64_t pooled_width,
    at::IntArrayRef level_sizes) {
  const int64_t L = static_cast<int64_t>(scales.size());
  TORCH_CHECK(L >= 1 && L <= kMaxLevels && static_cast<int64_t>(level_sizes.size()) == 2 + 2 * L,
              "_multilevel_roi_align_backward: level_sizes must be (N, C, H0, W0, ...) for ", L,
              " levels, got ", level_sizes);
  check_roi_align_backward_args(grad, rois, pooled_height, pooled_width, level_sizes[0],
                                level_sizes[1], level_sizes[2], level_sizes[3]);
  check_levels_tensor("_multilevel_roi_align_backward", levels, rois);
  std::vector<Level> lv;
  for (int64_t l = 0; l < L; ++l) {
    TORCH_CHECK(level_sizes[2 + 2 * l] >= 0 && level_sizes[3 + 2 * l] >= 0,
                "_multilevel_roi_align_backward: negative level size");
    lv.push_back(Level{level_sizes[2 + 2 * l], level_sizes[3 + 2 * l], scales[l]});
  }
  return lv;
}

}  // namespace instseg
