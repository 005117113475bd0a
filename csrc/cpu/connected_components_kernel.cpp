// Connected components on the CPU: one mask per task (masks in parallel), union-find over
// runs. A row scan cuts each row into runs of foreground pixels (numbered in raster order of
// their first pixel); each run is united with the runs of the row above that touch it
// (overlap for 4-connectivity, overlap or diagonal contact for 8), found by a merge of the two
// rows' sorted run lists. A union links the larger root to the smaller, so every component's
// root is its first run, whose first pixel is the component's first pixel in raster order.
// One pass over the runs then numbers the roots in that order and sums the areas, and a last
// row pass writes the labels (background zeros, then each run's label).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../connected_components_checks.h"

namespace instseg {
namespace {

struct Runs {
  std::vector<int32_t> start, end;  // [start, end) columns of each run
  std::vector<int32_t> row_begin;   // runs of row y: [row_begin[y], row_begin[y + 1])
  std::vector<int32_t> parent, label;
};

int32_t find_root(std::vector<int32_t>& parent, int32_t x) {
  int32_t r = x;
  while (parent[r] != r) r = parent[r];
  while (parent[x] != r) {  // path compression
    const int32_t next = parent[x];
    parent[x] = r;
    x = next;
  }
  return r;
}

void unite(std::vector<int32_t>& parent, int32_t a, int32_t b) {
  a = find_root(parent, a);
  b = find_root(parent, b);
  if (a == b) return;
  if (a < b) std::swap(a, b);
  parent[a] = b;  // the smaller index stays the root
}

// Appends the runs of one row (nonzero = foreground). One-byte types skip eight background
// pixels at a time (and eight foreground ones for bool, whose true is exactly 1).
template <typename T>
void scan_row(const T* row, int32_t w, Runs& r) {
  int32_t x = 0;
  while (x < w) {
    if constexpr (sizeof(T) == 1) {
      uint64_t word;
      while (x + 8 <= w && (std::memcpy(&word, row + x, 8), word == 0)) x += 8;
    }
    while (x < w && row[x] == T(0)) ++x;
    if (x == w) break;
    const int32_t s = x;
    if constexpr (std::is_same_v<T, bool>) {
      uint64_t word;
      while (x + 8 <= w && (std::memcpy(&word, row + x, 8), word == 0x0101010101010101ull)) x += 8;
    }
    while (x < w && row[x] != T(0)) ++x;
    r.start.push_back(s);
    r.end.push_back(x);
  }
}

// Labels one mask; returns the areas of its components (index k - 1 for label k).
template <typename T>
std::vector<int64_t> label_one(const T* fg, int64_t h, int64_t w, bool eight, int32_t* labels, Runs& r) {
  r.start.clear();
  r.end.clear();
  r.row_begin.assign(1, 0);
  for (int64_t y = 0; y < h; ++y) {
    scan_row(fg + y * w, static_cast<int32_t>(w), r);
    r.row_begin.push_back(static_cast<int32_t>(r.start.size()));
  }
  const int32_t n = static_cast<int32_t>(r.start.size());
  r.parent.resize(n);
  for (int32_t i = 0; i < n; ++i) r.parent[i] = i;
  // Run [s, e) touches the run [ps, pe) above it when ps < e + d and pe + d > s, d = 1 for
  // 8-connectivity (diagonal contact) and 0 for 4.
  const int32_t d = eight ? 1 : 0;
  for (int64_t y = 1; y < h; ++y) {
    int32_t j = r.row_begin[y - 1];
    const int32_t j_end = r.row_begin[y];
    for (int32_t i = r.row_begin[y]; i < r.row_begin[y + 1]; ++i) {
      const int32_t s = r.start[i], e = r.end[i];
      while (j < j_end && r.end[j] + d <= s) ++j;  // runs above that end before this one
      for (int32_t k = j; k < j_end && r.start[k] < e + d; ++k) unite(r.parent, i, k);
    }
  }
  std::vector<int64_t> areas;
  r.label.resize(n);
  for (int32_t i = 0; i < n; ++i) {
    const int32_t root = find_root(r.parent, i);
    if (root == i) {  // a component's first run (roots precede their runs)
      areas.push_back(0);
      r.label[i] = static_cast<int32_t>(areas.size());
    } else {
      r.label[i] = r.label[root];
    }
    areas[r.label[i] - 1] += r.end[i] - r.start[i];
  }
  for (int64_t y = 0; y < h; ++y) {
    int32_t* row = labels + y * w;
    int32_t x = 0;
    for (int32_t i = r.row_begin[y]; i < r.row_begin[y + 1]; ++i) {
      std::fill(row + x, row + r.start[i], 0);
      std::fill(row + r.start[i], row + r.end[i], r.label[i]);
      x = r.end[i];
    }
    std::fill(row + x, row + w, 0);
  }
  return areas;
}

std::tuple<at::Tensor, at::Tensor> connected_components_cpu(const at::Tensor& masks, int64_t connectivity) {
  check_connected_components_args(masks, connectivity);
  TORCH_CHECK(masks.device().is_cpu(), "connected_components: CPU kernel got ", masks.device(), " masks");
  const int64_t n = masks.size(0), h = masks.size(1), w = masks.size(2);
  const at::Tensor fg = masks.contiguous();
  at::Tensor labels = at::empty({n, h, w}, masks.options().dtype(at::kInt));
  std::vector<std::vector<int64_t>> areas(n);
  int32_t* lab_p = labels.data_ptr<int32_t>();
  AT_DISPATCH_INTEGRAL_TYPES_AND(at::kBool, fg.scalar_type(), "connected_components", [&] {
    const scalar_t* fg_p = fg.const_data_ptr<scalar_t>();
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      Runs runs;  // reused across the masks of this task
      for (int64_t i = b; i < e; ++i)
        areas[i] = label_one(fg_p + i * h * w, h, w, connectivity == 8, lab_p + i * h * w, runs);
    });
  });
  int64_t k = 0;
  for (const auto& a : areas) k = std::max<int64_t>(k, static_cast<int64_t>(a.size()));
  at::Tensor out = at::zeros({n, k}, masks.options().dtype(at::kLong));
  int64_t* out_p = out.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i) std::copy(areas[i].begin(), areas[i].end(), out_p + i * k);
  return {labels, out};
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("connected_components", TORCH_FN(connected_components_cpu));
}

}  // namespace instseg
