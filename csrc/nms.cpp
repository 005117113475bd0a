// Schema of the NMS op. Kernels: csrc/cpu/nms_kernel.cpp. Python wrappers,
// fake kernel: instseg_ops/nms.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // Greedy non-maximum suppression. boxes: Tensor[N, 4] (x1, y1, x2, y2);
  // scores: Tensor[N]; idxs: optional Tensor[N] of integer categories (NMS runs
  // per category when given). Returns the int64 indices of the kept boxes,
  // sorted by decreasing score, ties by increasing index; at most max_output of
  // them when max_output >= 0. Boxes whose score is below score_threshold, or
  // with a non-finite score or coordinate, are never kept.
  m.def(
      "nms(Tensor boxes, Tensor scores, Tensor? idxs, float iou_threshold, int max_output=-1, "
      "float? score_threshold=None) -> Tensor");
}
