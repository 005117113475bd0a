// Schemas of the multi-level (FPN) RoIAlign ops. The kernels share the RoIAlign
// kernels (csrc/cpu/roi_align_kernel.cpp, csrc/cuda/roi_align_kernel.cu), of
// which single-level roi_align is the one-level case.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // features: 1 to 8 maps Tensor[N, C, H_l, W_l] (one dtype, device, N and C);
  // rois: Tensor[K, 5]; levels: int64 Tensor[K], the index into `features`
  // each RoI pools from. Output Tensor[K, C, pooled_height, pooled_width] in RoI
  // order, channels_last when features[0] is (the other levels are read in
  // that layout too).
  m.def(
      "multilevel_roi_align(Tensor[] features, Tensor rois, Tensor levels, float[] spatial_scales, "
      "int pooled_height, int pooled_width, int sampling_ratio, bool aligned, "
      "bool deterministic=False) -> Tensor");
  // Gradients for every level; level_sizes = (N, C, H0, W0, H1, W1, ...).
  m.def(
      "_multilevel_roi_align_backward(Tensor grad, Tensor rois, Tensor levels, "
      "float[] spatial_scales, int pooled_height, int pooled_width, SymInt[] level_sizes, "
      "int sampling_ratio, bool aligned, bool channels_last, bool deterministic) -> Tensor[]");
}
