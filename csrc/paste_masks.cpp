// Schemas of mask pasting. Kernels: csrc/cpu/paste_masks_kernel.cpp and
// csrc/cuda/paste_masks_kernel.cu; geometry shared by both:
// csrc/paste_masks_common.h. Python wrappers and fake kernels:
// instseg_ops/paste_masks.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // masks: Tensor[N, M, M] (per-RoI probabilities); boxes: Tensor[N, 4] in image
  // coordinates. Returns Tensor[N, image_height, image_width]: the masks'
  // dtype, or bool (value >= threshold) when a threshold is given.
  // aligned=false: torchvision's paste_masks_in_image (pad by `padding`, expand
  // the box by the same ratio, integer box, bilinear resize, clip).
  // aligned=true: detectron2's grid_sample pasting (sub-pixel box, pixel
  // centres at +0.5, zeros outside the mask; `padding` unused).
  m.def(
      "paste_masks(Tensor masks, Tensor boxes, int image_height, int image_width, int padding, "
      "float? threshold, bool aligned) -> Tensor");
  // The same values without the canvases: each mask only over its region, the
  // clipped pixels [y0, y1) x [x0, x1) it may write (all other pixels of its
  // canvas are 0). Returns (data, regions, offsets): regions int64 [N, 4]
  // (x0, y0, x1, y1), offsets int64 [N + 1], and data 1-D with mask n's region
  // in row-major order at data[offsets[n]:offsets[n + 1]].
  m.def(
      "paste_masks_crops(Tensor masks, Tensor boxes, int image_height, int image_width, int padding, "
      "float? threshold, bool aligned) -> (Tensor, Tensor, Tensor)");
  // Gradients with respect to the masks (boxes get none, as in torchvision).
  // grad: Tensor[N, image_height, image_width] of the masks' dtype; returns a
  // contiguous Tensor[N, M, M] of the masks' dtype (accumulated in float32, or
  // float64 for float64 masks). Deterministic: no atomics on either device.
  m.def(
      "_paste_masks_backward(Tensor grad, Tensor masks, Tensor boxes, int image_height, int image_width, "
      "int padding, bool aligned) -> Tensor");
  // The same for paste_masks_crops: grad is 1-D (the gradient of its data),
  // regions and offsets are its outputs (checked against the geometry).
  m.def(
      "_paste_masks_crops_backward(Tensor grad, Tensor masks, Tensor boxes, Tensor regions, Tensor offsets, "
      "int image_height, int image_width, int padding, bool aligned) -> Tensor");
}
