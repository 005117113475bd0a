// Schema of Soft-NMS (Bodla et al., 2017). Kernels: csrc/cpu/soft_nms_kernel.cpp,
// csrc/cuda/soft_nms_kernel.cu; Python wrapper and fake kernel:
// instseg_ops/nms.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // Repeatedly keeps the remaining box with the highest (decayed) score, ties
  // by lower index, and decays the scores of the others by their IoU with it:
  // method 0 (linear): s *= 1 - IoU when IoU > iou_threshold;
  // method 1 (gaussian): s *= exp(-IoU^2 / sigma).
  // Boxes whose score is, or decays, below score_threshold are dropped, as are
  // boxes with a non-finite score or coordinate. Returns (kept indices, int64,
  // in selection order; their scores at selection, in the scores' dtype).
  m.def(
      "soft_nms(Tensor boxes, Tensor scores, float iou_threshold, float sigma, "
      "float score_threshold, int method) -> (Tensor, Tensor)");
}
