// Feature-map levels (an FPN pyramid) as the multi-level RoIAlign kernels see
// them, and the host helpers that build them from the level tensors.
#pragma once

#include <ATen/core/Tensor.h>

#include "tensor_utils.h"

#include <cstdint>
#include <vector>

namespace instseg {

// One feature-map level: its size and the scale from image to level coordinates.
struct Level {
  int64_t H, W;
  double scale;
};

// The CUDA kernels take the levels by value; more than FPN ever needs.
constexpr int64_t kMaxLevels = 8;

// The levels in one memory format (channels_last or contiguous): a no-op for
// levels already in it.
inline std::vector<at::Tensor> same_layout(at::TensorList features, bool channels_last) {
  std::vector<at::Tensor> out;
  for (const at::Tensor& f : features)
    out.push_back(f.contiguous(memory_format(channels_last)));
  return out;
}

// Level sizes of NCHW (or channels_last) feature maps, with their scales.
inline std::vector<Level> levels_of(const std::vector<at::Tensor>& feats,
                                    at::ArrayRef<double> scales) {
  std::vector<Level> lv;
  for (size_t i = 0; i < feats.size(); ++i)
    lv.push_back(Level{feats[i].size(2), feats[i].size(3), scales[i]});
  return lv;
}

}  // namespace instseg
