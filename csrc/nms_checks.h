// Argument checks of the NMS op, shared by its kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "tensor_utils.h"

#include <cmath>
#include <limits>
#include <optional>

namespace instseg {

// Thresholds are float64 in the schema and compared exactly with IoUs and scores
// computed in T (float32 or float64), as torchvision's CPU kernel does by promoting
// its float IoU to double. Rounding the threshold to T first would not: a float32
// IoU of 0.30000001 equals float(0.3) and would escape an "IoU > 0.3" test. For a
// value x of type T, x > t exactly iff x > below<T>(t), the largest T <= t, and
// x >= t iff x >= above<T>(t), the smallest T >= t.
// Beyond T's range (a finite double converted to float is then undefined
// behaviour) the answers are the largest finite T or an infinity.
template <typename T>
inline T threshold_below(double t) {
  const double max = static_cast<double>(std::numeric_limits<T>::max());
  if (t > max) return std::isinf(t) ? std::numeric_limits<T>::infinity() : std::numeric_limits<T>::max();
  if (t < -max) return -std::numeric_limits<T>::infinity();
  T r = static_cast<T>(t);
  if (static_cast<double>(r) > t) r = std::nextafter(r, -std::numeric_limits<T>::infinity());
  return r;
}

template <typename T>
inline T threshold_above(double t) {
  const double max = static_cast<double>(std::numeric_limits<T>::max());
  if (t > max) return std::numeric_limits<T>::infinity();
  if (t < -max) return std::isinf(t) ? -std::numeric_limits<T>::infinity() : std::numeric_limits<T>::lowest();
  T r = static_cast<T>(t);
  if (static_cast<double>(r) < t) r = std::nextafter(r, std::numeric_limits<T>::infinity());
  return r;
}

// Soft-NMS's sigma in T: clamped to [smallest normal, largest finite] of T, so
// that a tiny positive sigma does not become 0 (and -iou^2 / sigma NaN).
template <typename T>
inline T sigma_as(double sigma) {
  const double lo = static_cast<double>(std::numeric_limits<T>::min());
  const double hi = static_cast<double>(std::numeric_limits<T>::max());
  return static_cast<T>(sigma < lo ? lo : (sigma > hi ? hi : sigma));
}

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
  TORCH_CHECK(method == 0 || (sigma > 0 && !std::isinf(sigma)),
              "soft_nms: sigma must be finite and > 0 for the gaussian method, got ", sigma);
  TORCH_CHECK(!std::isnan(score_threshold), "soft_nms: score_threshold is NaN");
}

}  // namespace instseg
