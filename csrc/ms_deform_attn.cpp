// Schemas of the multi-scale deformable attention ops (Deformable DETR,
// Mask2Former). Kernels live in csrc/cpu and csrc/cuda; fake kernels and
// autograd are registered from Python (instseg_ops/ms_deform_attn.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // value: [N, S, M, D]; spatial_shapes: int64 [L, 2] (H, W); level_start_index:
  // int64 [L]; sampling_locations: [N, Lq, M, L, P, 2] ((x, y) in [0, 1]);
  // attention_weights: [N, Lq, M, L, P]. Output: [N, Lq, M * D], value's dtype.
  // `deterministic` is accepted for the autograd formula; the forward kernels
  // are deterministic either way.
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights, bool deterministic=False) -> Tensor");
  // Gradients with respect to value, sampling_locations and attention_weights,
  // each contiguous with its input's shape and dtype.
  m.def(
      "_ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights, "
      "bool deterministic) -> (Tensor, Tensor, Tensor)");
}
