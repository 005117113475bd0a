// Connected components on the CPU: one mask per task (masks in parallel), union-find over
// the raster scan. Each foreground pixel is united with its already-visited neighbours
// (left and up, plus up-left and up-right for 8-connectivity); a union links the larger root
// to the smaller, so every component's root is its first pixel in raster order. A second
// scan numbers the roots in that order and gives every pixel its root's number.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "../connected_components_checks.h"

namespace instseg {
namespace {

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

// Labels one mask; returns the areas of its components (index k - 1 for label k).
std::vector<int64_t> label_one(const uint8_t* fg, int64_t h, int64_t w, bool eight, int32_t* labels) {
  const int32_t n = static_cast<int32_t>(h * w);
  std::vector<int32_t> parent(n);
  for (int32_t p = 0; p < n; ++p) parent[p] = p;
  for (int64_t y = 0; y < h; ++y) {
    for (int64_t x = 0; x < w; ++x) {
      const int32_t p = static_cast<int32_t>(y * w + x);
      if (!fg[p]) continue;
      if (x > 0 && fg[p - 1]) unite(parent, p, p - 1);
      if (y > 0) {
        const int32_t up = static_cast<int32_t>(p - w);
        if (fg[up]) unite(parent, p, up);
        if (eight && x > 0 && fg[up - 1]) unite(parent, p, up - 1);
        if (eight && x + 1 < w && fg[up + 1]) unite(parent, p, up + 1);
      }
    }
  }
  std::vector<int64_t> areas;
  for (int32_t p = 0; p < n; ++p) {
    if (!fg[p]) {
      labels[p] = 0;
      continue;
    }
    const int32_t r = find_root(parent, p);
    if (r == p) {  // the first pixel of a new component (roots precede their pixels)
      areas.push_back(0);
      labels[p] = static_cast<int32_t>(areas.size());
    } else {
      labels[p] = labels[r];
    }
    ++areas[labels[p] - 1];
  }
  return areas;
}

std::tuple<at::Tensor, at::Tensor> connected_components_cpu(const at::Tensor& masks, int64_t connectivity) {
  check_connected_components_args(masks, connectivity);
  TORCH_CHECK(masks.device().is_cpu(), "connected_components: CPU kernel got ", masks.device(), " masks");
  const int64_t n = masks.size(0), h = masks.size(1), w = masks.size(2);
  const at::Tensor fg = masks.ne(0).to(at::kByte).contiguous();
  at::Tensor labels = at::empty({n, h, w}, masks.options().dtype(at::kInt));
  std::vector<std::vector<int64_t>> areas(n);
  const uint8_t* fg_p = fg.data_ptr<uint8_t>();
  int32_t* lab_p = labels.data_ptr<int32_t>();
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      areas[i] = label_one(fg_p + i * h * w, h, w, connectivity == 8, lab_p + i * h * w);
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
