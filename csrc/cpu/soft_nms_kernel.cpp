// Soft-NMS on the CPU: O(N^2) in the worst case, each step a vectorisable pass
// over the boxes still alive, which are kept compacted (swap-remove) with their
// original indices, so ties are broken by original index as the op says.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../nms_checks.h"

namespace instseg {
namespace {

template <typename T>
void soft_nms_impl(const T* bx, const T* sc, int64_t n, T thr, T sigma, T score_thr, int64_t method,
                   std::vector<int64_t>& kept, std::vector<T>& kept_scores) {
  std::vector<T> x1, y1, x2, y2, area, s;
  std::vector<int64_t> idx;
  for (int64_t i = 0; i < n; ++i) {
    const T* b = bx + i * 4;
    if (!std::isfinite(sc[i]) || !(sc[i] >= score_thr) || !std::isfinite(b[0]) ||
        !std::isfinite(b[1]) || !std::isfinite(b[2]) || !std::isfinite(b[3]))
      continue;
    x1.push_back(b[0]);
    y1.push_back(b[1]);
    x2.push_back(b[2]);
    y2.push_back(b[3]);
    area.push_back((b[2] - b[0]) * (b[3] - b[1]));
    s.push_back(sc[i]);
    idx.push_back(i);
  }
  int64_t alive = static_cast<int64_t>(idx.size());
  auto remove = [&](int64_t p) {  // swap-remove position p
    --alive;
    x1[p] = x1[alive];
    y1[p] = y1[alive];
    x2[p] = x2[alive];
    y2[p] = y2[alive];
    area[p] = area[alive];
    s[p] = s[alive];
    idx[p] = idx[alive];
  };
  while (alive > 0) {
    int64_t m = 0;
    for (int64_t p = 1; p < alive; ++p)
      if (s[p] > s[m] || (s[p] == s[m] && idx[p] < idx[m])) m = p;
    kept.push_back(idx[m]);
    kept_scores.push_back(s[m]);
    const T mx1 = x1[m], my1 = y1[m], mx2 = x2[m], my2 = y2[m], marea = area[m];
    remove(m);
    for (int64_t p = 0; p < alive; ++p) {
      const T w = std::max(T(0), std::min(mx2, x2[p]) - std::max(mx1, x1[p]));
      const T h = std::max(T(0), std::min(my2, y2[p]) - std::max(my1, y1[p]));
      const T inter = w * h;
      const T iou = inter / (marea + area[p] - inter);
      if (method == 0) {
        if (iou > thr) s[p] *= T(1) - iou;
      } else {
        s[p] *= std::exp(-(iou * iou) / sigma);
      }
    }
    for (int64_t p = alive - 1; p >= 0; --p)
      if (!(s[p] >= score_thr)) remove(p);
  }
}

std::tuple<at::Tensor, at::Tensor> soft_nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                                                double iou_threshold, double sigma,
                                                double score_threshold, int64_t method) {
  check_soft_nms_args(boxes, scores, iou_threshold, sigma, score_threshold, method);
  TORCH_CHECK(boxes.device().is_cpu(), "soft_nms: CPU kernel got ", boxes.device(), " boxes");
  const at::ScalarType acc = acc_dtype(boxes.scalar_type());
  const at::Tensor b = boxes.to(acc).contiguous();
  const at::Tensor s = scores.to(acc).contiguous();
  at::Tensor keep, kept_scores;
  AT_DISPATCH_FLOATING_TYPES(acc, "soft_nms_cpu", [&] {
    std::vector<int64_t> k;
    std::vector<scalar_t> ks;
    soft_nms_impl<scalar_t>(b.data_ptr<scalar_t>(), s.data_ptr<scalar_t>(), b.size(0),
                            threshold_below<scalar_t>(iou_threshold), sigma_as<scalar_t>(sigma),
                            threshold_above<scalar_t>(score_threshold), method, k, ks);
    const int64_t count = static_cast<int64_t>(k.size());
    keep = at::empty({count}, boxes.options().dtype(at::kLong));
    kept_scores = at::empty({count}, b.options());
    std::copy(k.begin(), k.end(), keep.data_ptr<int64_t>());
    std::copy(ks.begin(), ks.end(), kept_scores.data_ptr<scalar_t>());
  });
  return {keep, kept_scores.to(scores.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("soft_nms", TORCH_FN(soft_nms_cpu));
}

}  // namespace instseg
