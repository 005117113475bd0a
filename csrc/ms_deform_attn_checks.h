// Argument checks shared by the CPU and CUDA multi-scale deformable attention
// kernels. Shapes, dtypes and devices are checked from metadata; the level
// table (spatial_shapes, level_start_index) is checked from its values, which
// the caller provides on the host.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace instseg {

struct MsdaSizes {
  int64_t N, S, M, D, Lq, L, P;
};

inline MsdaSizes check_ms_deform_attn_args(const char* op, const at::Tensor& value,
                                           const at::Tensor& spatial_shapes,
                                           const at::Tensor& level_start_index,
                                           const at::Tensor& sampling_locations,
                                           const at::Tensor& attention_weights) {
  TORCH_CHECK(value.dim() == 4, op, ": value must be a 4-D tensor [N, S, M, D], got shape ",
              value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2, op,
              ": spatial_shapes must be a Tensor[L, 2] of (H, W), got shape ",
              spatial_shapes.sizes());
  const int64_t L = spatial_shapes.size(0);
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == L, op,
              ": level_start_index must be a Tensor[L] with L = ", L,
              " (the rows of spatial_shapes), got shape ", level_start_index.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6, op,
              ": sampling_locations must be a 6-D tensor [N, Lq, M, L, P, 2], got shape ",
              sampling_locations.sizes());
  TORCH_CHECK(attention_weights.dim() == 5, op,
              ": attention_weights must be a 5-D tensor [N, Lq, M, L, P], got shape ",
              attention_weights.sizes());
  const MsdaSizes s{value.size(0),
                    value.size(1),
                    value.size(2),
                    value.size(3),
                    sampling_locations.size(1),
                    L,
                    sampling_locations.size(4)};
  const auto& ls = sampling_locations.sizes();
  TORCH_CHECK(ls[0] == s.N && ls[2] == s.M && ls[3] == L && ls[5] == 2, op,
              ": sampling_locations must have shape [N, Lq, M, L, P, 2] with N = ", s.N,
              ", M = ", s.M, " (from value ", value.sizes(), ") and L = ", L,
              " (from spatial_shapes), got ", ls);
  TORCH_CHECK(attention_weights.sizes() == ls.slice(0, 5), op,
              ": attention_weights must have shape [N, Lq, M, L, P] = ", ls.slice(0, 5),
              " (from sampling_locations), got ", attention_weights.sizes());
  TORCH_CHECK(c10::isFloatingType(value.scalar_type()), op,
              ": value must be a floating tensor, got ", value.scalar_type());
  TORCH_CHECK(c10::isFloatingType(sampling_locations.scalar_type()), op,
              ": sampling_locations must be a floating tensor, got ",
              sampling_locations.scalar_type());
  TORCH_CHECK(c10::isFloatingType(attention_weights.scalar_type()), op,
              ": attention_weights must be a floating tensor, got ",
              attention_weights.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong, op,
              ": spatial_shapes must be int64, got ", spatial_shapes.scalar_type());
  TORCH_CHECK(level_start_index.scalar_type() == at::kLong, op,
              ": level_start_index must be int64, got ", level_start_index.scalar_type());
  const at::Device dev = value.device();
  TORCH_CHECK(spatial_shapes.device() == dev, op, ": value is on ", dev,
              " but spatial_shapes is on ", spatial_shapes.device());
  TORCH_CHECK(level_start_index.device() == dev, op, ": value is on ", dev,
              " but level_start_index is on ", level_start_index.device());
  TORCH_CHECK(sampling_locations.device() == dev, op, ": value is on ", dev,
              " but sampling_locations is on ", sampling_locations.device());
  TORCH_CHECK(attention_weights.device() == dev, op, ": value is on ", dev,
              " but attention_weights is on ", attention_weights.device());
  return s;
}

inline void check_grad_output(const char* op, const at::Tensor& grad_output,
                              const at::Tensor& value, const MsdaSizes& s) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.N && grad_output.size(1) == s.Lq &&
                  grad_output.size(2) == s.M * s.D,
              op, ": grad_output must have shape [N, Lq, M * D] = [", s.N, ", ", s.Lq, ", ",
              s.M * s.D, "], got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type(), op,
              ": grad_output must have the dtype of value (", value.scalar_type(), "), got ",
              grad_output.scalar_type());
  TORCH_CHECK(grad_output.device() == value.device(), op, ": value is on ", value.device(),
              " but grad_output is on ", grad_output.device());
}

// `shapes` = spatial_shapes (L rows of H, W) and `starts` = level_start_index,
// contiguous host copies. The levels must tile the S value rows in order:
// starts[0] = 0, starts[l + 1] = starts[l] + H_l * W_l, sum H_l * W_l = S.
inline void check_level_table(const char* op, const int64_t* shapes, const int64_t* starts,
                              int64_t L, int64_t S) {
  int64_t offset = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t H = shapes[2 * l], W = shapes[2 * l + 1];
    TORCH_CHECK(H >= 0 && W >= 0, op, ": spatial_shapes[", l, "] = (", H, ", ", W,
                ") must not be negative");
    TORCH_CHECK(H == 0 || W <= (S - offset) / H, op, ": the areas of spatial_shapes exceed the ",
                S, " rows of value (level ", l, " is ", H, " x ", W, " and starts at row ",
                offset, ")");
    TORCH_CHECK(starts[l] == offset, op, ": level_start_index[", l, "] = ", starts[l],
                " is inconsistent with spatial_shapes, which put level ", l, " at row ", offset);
    offset += H * W;
  }
  TORCH_CHECK(offset == S, op, ": the areas of spatial_shapes sum to ", offset,
              " but value has S = ", S, " rows (value must be [N, sum H_l * W_l, M, D])");
}

}  // namespace instseg
