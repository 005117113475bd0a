// Schema of the connected-components op. Kernels: csrc/cpu/connected_components_kernel.cpp,
// csrc/cuda/connected_components_kernel.cu. Python wrapper, fake kernel: instseg_ops/masks.py.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(instseg, m) {
  // Connected components of each (H, W) mask of a batch. masks: Tensor[N, H, W] of bool or
  // an integer type (nonzero = foreground); connectivity 4 or 8. Returns labels
  // (Tensor[N, H, W] int32: 0 for background, 1..K_n for the components of mask n numbered
  // in raster order of their first pixel, as scipy.ndimage.label) and areas (Tensor[N, K]
  // int64, areas[n][k - 1] the pixel count of component k of mask n, K = max K_n, zeros
  // beyond K_n).
  m.def("connected_components(Tensor masks, int connectivity=8) -> (Tensor, Tensor)");
}
