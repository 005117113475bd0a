// Small helpers shared by the kernels of every op.
#pragma once

#include <ATen/core/Tensor.h>

namespace instseg {

// The dtype geometry and accumulation use: float64 for float64, float32 otherwise
// (half/bfloat16 accumulate in float).
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The layout rule of the RoIAlign kernels (mirrored by instseg_ops.roi_align.
// is_channels_last): channels_last only when not also plain contiguous.
inline bool use_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

}  // namespace instseg
