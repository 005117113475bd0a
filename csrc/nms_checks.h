// Argument checks of the NMS op, shared by its kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "tensor_utils.h"

#include <cmath>
#include <optional>

namespace instseg {

inline void check_nms_args(const at::Tensor& boxes, const at::Tensor& scores,
                           const std::optional<at::Tensor>& idxs, double iou_threshold) {
  TORCH_CHECK(boxes.dim() == 2 && boxes.size(1) == 4,
              "nms: boxes must be a Tensor[N, 4] (x1, y1, x2, y2), got shape ", boxes.sizes());
  TORCH_CHECK(scores.dim() == 1 && scores.size(0) == boxes.size(0),
              "nms: scores must be a Tensor[N] with one score per box, got shape ", scores.sizes(),
              " for ", boxes.size(0), " boxes");
  TORCH_CHECK(c10::isFloatingType(boxes.scalar_type()) && c10::isFloatingType(scores.scalar_type()),
              "nms: boxes and scores must be floating tensors, got ", boxes.scalar_type(), " and ",
              scores.scalar_type());
  TORCH_CHECK(boxes.device() == scores.device(), "nms: boxes are on ", boxes.device(),
              " but scores are on ", scores.device());
  TORCH_CHECK(!std::isnan(iou_threshold), "nms: iou_threshold is NaN");
  if (idxs) {
    TORCH_CHECK(idxs->dim() == 1 && idxs->size(0) == boxes.size(0),
                "batched_nms: idxs must be a Tensor[N] with one category per box, got shape ",
                idxs->sizes());
    TORCH_CHECK(c10::isIntegralType(idxs->scalar_type(), /*includeBool=*/false),
                "batched_nms: idxs must be an integer tensor, got ", idxs->scalar_type());
    TORCH_CHECK(idxs->device() == boxes.device(), "batched_nms: idxs are on ", idxs->device(),
                " but boxes are on ", boxes.device());
  }
}

inline void check_soft_nms_args(const at::Tensor& boxes, const at::Tensor& scores,
                                double iou_threshold, double sigma, double score_threshold,
                                int64_t method) {
  check_nms_args(boxes, scores, std::nullopt, iou_threshold);
  TORCH_CHECK(method == 0 || method == 1, "soft_nms: method must be 0 (linear) or 1 (gaussian), got ",
              method);
  TORCH_CHECK(method == 0 || sigma > 0, "soft_nms: sigma must be > 0 for the gaussian method, got ",
              sigma);
  TORCH_CHECK(!std::isnan(score_threshold), "soft_nms: score_threshold is NaN");
}

}  // namespace instseg
