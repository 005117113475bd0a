// Schema of mask pasting. Kernels: csrc/cpu/paste_masks_kernel.cpp. Python
// wrapper and fake kernel: instseg_ops/paste_masks.py.
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
}
