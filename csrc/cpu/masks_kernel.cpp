// The binary-mask ops on the CPU, masks in parallel (at::parallel_for), one pass over each
// mask:
//   masks_to_boxes: per row, the first foreground column (eight background bytes skipped at a
//     time for one-byte types) and, when there is one, the last one beyond the box so far;
//   masks_to_rle: the mask is transposed by bands of 64 columns into a column-major byte
//     buffer, whose runs are then measured in one linear scan;
//   stability_score_and_boxes: per pixel, the two threshold counts and the row's first and
//     last pixel above the mask threshold.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <vector>

#include "../masks_checks.h"

namespace instseg {
namespace {

// The first index in [x, end) with row[i] != 0, or end.
template <typename T>
int64_t first_set(const T* row, int64_t x, int64_t end) {
  if constexpr (sizeof(T) == 1) {
    uint64_t word;
    while (x + 8 <= end && (std::memcpy(&word, row + x, 8), word == 0)) x += 8;
  }
  while (x < end && row[x] == T(0)) ++x;
  return x;
}

// Box accumulator: XYXY with inclusive maxima; empty while x2 < 0.
struct Box {
  int64_t x1 = std::numeric_limits<int64_t>::max(), y1 = 0, x2 = -1, y2 = -1;
  void add_row(int64_t y, int64_t first, int64_t last) {
    if (y2 < 0) y1 = y;
    y2 = y;
    x1 = std::min(x1, first);
    x2 = std::max(x2, last);
  }
  void store(int64_t* out) const {
    const bool empty = x2 < 0;
    out[0] = empty ? 0 : x1;
    out[1] = empty ? 0 : y1;
    out[2] = empty ? 0 : x2;
    out[3] = empty ? 0 : y2;
  }
};

template <typename T>
void box_one(const T* m, int64_t h, int64_t w, int64_t* out) {
  Box box;
  for (int64_t y = 0; y < h; ++y) {
    const T* row = m + y * w;
    const int64_t first = first_set(row, 0, w);
    if (first == w) continue;
    // the last set column, looked for only beyond the box's right edge so far
    int64_t last = w - 1;
    const int64_t stop = std::max(first, box.x2);
    while (last > stop && row[last] == T(0)) --last;
    box.add_row(y, first, last);
  }
  box.store(out);
}

at::Tensor masks_to_boxes_cpu(const at::Tensor& masks) {
  check_binary_masks(masks, "masks_to_boxes");
  TORCH_CHECK(masks.device().is_cpu(), "masks_to_boxes: CPU kernel got ", masks.device(), " masks");
  const int64_t n = masks.size(0), h = masks.size(1), w = masks.size(2);
  const at::Tensor m = masks.contiguous();
  at::Tensor boxes = at::empty({n, 4}, masks.options().dtype(at::kLong));
  int64_t* out = boxes.data_ptr<int64_t>();
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, m.scalar_type(), "masks_to_boxes", [&] {
    const scalar_t* p = m.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) box_one(p + i * h * w, h, w, out + 4 * i);
    });
  });
  return boxes;
}

// Run lengths of one mask in column-major order, zeros first.
template <typename T>
void rle_one(const T* m, int64_t h, int64_t w, std::vector<uint8_t>& buf, std::vector<int64_t>& counts) {
  counts.clear();
  if (h * w == 0) return;
  constexpr int64_t kBand = 64;
  buf.resize(static_cast<size_t>(h * std::min(kBand, w)));
  bool cur = false;  // the value of the run being measured
  int64_t len = 0;
  for (int64_t x0 = 0; x0 < w; x0 += kBand) {
    const int64_t nb = std::min(kBand, w - x0);
    for (int64_t y = 0; y < h; ++y) {
      const T* row = m + y * w + x0;
      for (int64_t j = 0; j < nb; ++j) buf[j * h + y] = row[j] != T(0);
    }
    const uint8_t* col = buf.data();
    const int64_t total = nb * h;
    int64_t i = 0;
    while (i < total) {
      // the end of the run of `cur` values starting at i
      int64_t j = i;
      const uint64_t same = cur ? 0x0101010101010101ull : 0;
      uint64_t word;
      while (j + 8 <= total && (std::memcpy(&word, col + j, 8), word == same)) j += 8;
      while (j < total && col[j] == static_cast<uint8_t>(cur)) ++j;
      len += j - i;
      i = j;
      if (i < total) {  // the value changes at i
        counts.push_back(len);
        len = 0;
        cur = !cur;
      }
    }
  }
  counts.push_back(len);
}

std::tuple<at::Tensor, at::Tensor> masks_to_rle_cpu(const at::Tensor& masks) {
  check_binary_masks(masks, "masks_to_rle");
  TORCH_CHECK(masks.device().is_cpu(), "masks_to_rle: CPU kernel got ", masks.device(), " masks");
  const int64_t n = masks.size(0), h = masks.size(1), w = masks.size(2);
  const at::Tensor m = masks.contiguous();
  std::vector<std::vector<int64_t>> runs(n);
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, m.scalar_type(), "masks_to_rle", [&] {
    const scalar_t* p = m.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      std::vector<uint8_t> buf;  // reused across the masks of this task
      for (int64_t i = b; i < e; ++i) rle_one(p + i * h * w, h, w, buf, runs[i]);
    });
  });
  at::Tensor offsets = at::empty({n + 1}, masks.options().dtype(at::kLong));
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t i = 0; i < n; ++i) off[i + 1] = off[i] + static_cast<int64_t>(runs[i].size());
  at::Tensor counts = at::empty({off[n]}, masks.options().dtype(at::kLong));
  int64_t* c = counts.data_ptr<int64_t>();
  at::parallel_for(0, n, 16, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::copy(runs[i].begin(), runs[i].end(), c + off[i]);
  });
  return {counts, offsets};
}

template <typename T>
void scores_one(const T* m, int64_t h, int64_t w, T mid, T hi, T lo, float* score, int64_t* box_out) {
  using acc_t = at::opmath_type<T>;
  const acc_t a_mid = mid, a_hi = hi, a_lo = lo;
  int64_t inter = 0, uni = 0;
  Box box;
  for (int64_t y = 0; y < h; ++y) {
    const T* row = m + y * w;
    int64_t first = -1, last = -1;
    for (int64_t x = 0; x < w; ++x) {
      const acc_t v = static_cast<acc_t>(row[x]);
      inter += v > a_hi;
      uni += v > a_lo;
      if (v > a_mid) {
        if (first < 0) first = x;
        last = x;
      }
    }
    if (first >= 0) box.add_row(y, first, last);
  }
  // int32 / int32 true division in torch: both converted to float32
  *score = static_cast<float>(inter) / static_cast<float>(uni);
  box.store(box_out);
}

std::tuple<at::Tensor, at::Tensor> stability_score_and_boxes_cpu(const at::Tensor& logits, double mask_threshold,
                                                                 double offset) {
  check_mask_logits(logits, mask_threshold, offset);
  TORCH_CHECK(logits.device().is_cpu(), "stability_score_and_boxes: CPU kernel got ", logits.device(), " logits");
  const int64_t n = logits.size(0), h = logits.size(1), w = logits.size(2);
  const at::Tensor l = logits.contiguous();
  at::Tensor scores = at::empty({n}, logits.options().dtype(at::kFloat));
  at::Tensor boxes = at::empty({n, 4}, logits.options().dtype(at::kLong));
  float* s = scores.data_ptr<float>();
  int64_t* bx = boxes.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, l.scalar_type(), "stability_score_and_boxes", [&] {
    const scalar_t* p = l.const_data_ptr<scalar_t>();
    const scalar_t mid = static_cast<scalar_t>(mask_threshold);
    const scalar_t hi = static_cast<scalar_t>(mask_threshold + offset);
    const scalar_t lo = static_cast<scalar_t>(mask_threshold - offset);
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) scores_one(p + i * h * w, h, w, mid, hi, lo, s + i, bx + 4 * i);
    });
  });
  return {scores, boxes};
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("masks_to_boxes", TORCH_FN(masks_to_boxes_cpu));
  m.impl("masks_to_rle", TORCH_FN(masks_to_rle_cpu));
  m.impl("stability_score_and_boxes", TORCH_FN(stability_score_and_boxes_cpu));
}

}  // namespace instseg
