// Schemas of the binary-mask ops used by the SAM automatic mask generator. Kernels:
// csrc/cpu/masks_kernel.cpp, csrc/cuda/masks_kernel.cu; argument checks shared by both:
// csrc/masks_checks.h. Python wrappers and fake kernels: instseg_ops/masks.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // masks: Tensor[N, H, W] of bool or an integer type (nonzero = foreground). Returns int64
  // Tensor[N, 4]: XYXY boxes with inclusive maxima (the tightest box's first and last column
  // and row), [0, 0, 0, 0] for an empty mask (segment_anything's batched_mask_to_box).
  m.def("masks_to_boxes(Tensor masks) -> Tensor");
  // Uncompressed COCO run-length encoding of each mask of masks (Tensor[N, H, W], bool or an
  // integer type): run lengths in column-major (Fortran) order, alternating zeros and ones and
  // starting with the zeros (a 0 first when the first pixel is set). Returns (counts, offsets):
  // counts int64 Tensor[C], all masks' runs one after the other; offsets int64 Tensor[N + 1],
  // mask n's runs are counts[offsets[n]:offsets[n + 1]] (none when H * W == 0).
  m.def("masks_to_rle(Tensor masks) -> (Tensor, Tensor)");
  // One pass over mask logits (Tensor[N, H, W], floating point): SAM's stability score
  // (float32 Tensor[N]: the number of pixels > mask_threshold + offset over the number
  // > mask_threshold - offset, NaN when the latter is 0) and the boxes (int64 Tensor[N, 4], as
  // masks_to_boxes) of the masks logits > mask_threshold. Thresholds are rounded to the logits'
  // dtype before comparing, as torch does for `logits > threshold`.
  m.def("stability_score_and_boxes(Tensor logits, float mask_threshold, float offset) -> (Tensor, Tensor)");
}
