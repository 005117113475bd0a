// Schemas of the RoIAlign ops. Kernels live in csrc/cpu and csrc/cuda; fake
// (meta) kernels and autograd are registered from Python
// (instseg_ops/roi_align.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // rois: Tensor[K, 5] (batch index, x1, y1, x2, y2), any floating dtype.
  // Output: Tensor[K, C, pooled_height, pooled_width], channels_last when the
  // input is channels_last. `deterministic` is accepted for the autograd
  // formula; the forward kernels are deterministic either way.
  m.def(
      "roi_align(Tensor input, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, int sampling_ratio, bool aligned, bool deterministic=False) -> Tensor");
  // Gradient of roi_align with respect to `input`: Tensor[batch_size, channels,
  // height, width], channels_last when `channels_last` is true.
  m.def(
      "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, int pooled_height, "
      "int pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
      "int sampling_ratio, bool aligned, bool channels_last, bool deterministic) -> Tensor");
}
