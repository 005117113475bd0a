// Non-maximum suppression on the CPU.
//
// Candidates (a score that is not NaN, +-inf included as in torchvision, a finite
// box, score >= score_threshold) are sorted by
// (category, score descending, index ascending). Each category is then a
// contiguous segment, processed by the exact greedy algorithm: the best
// remaining box is kept and suppresses every later box of its segment whose IoU
// with it is > iou_threshold. The IoU of a kept box against the rest of its
// segment is one branch-free loop over structure-of-arrays coordinates, which
// the compiler vectorises; segments (categories) run in parallel. IoU
// arithmetic is in float32 (float64 for float64 input), with torchvision's
// formula: inter / (area_i + area_j - inter), areas (x2 - x1) * (y2 - y1); the
// IoU is compared with the float64 threshold exactly (see nms_checks.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <optional>
#include <vector>

#include "../nms_checks.h"

namespace instseg {
namespace {

template <typename T>
struct SortedBoxes {
  std::vector<T> x1, y1, x2, y2, area;
};

// Greedy NMS of positions [begin, end) of the sorted arrays; appends the kept
// positions (in order) to `kept`. At most `limit` are kept when limit >= 0.
template <typename T>
void greedy_segment(const SortedBoxes<T>& b, int64_t begin, int64_t end, T thr, int64_t limit,
                    std::vector<int32_t>& suppressed, std::vector<int64_t>& kept) {
  const T* __restrict__ x1 = b.x1.data();
  const T* __restrict__ y1 = b.y1.data();
  const T* __restrict__ x2 = b.x2.data();
  const T* __restrict__ y2 = b.y2.data();
  const T* __restrict__ area = b.area.data();
  int32_t* __restrict__ sup = suppressed.data();
  int64_t n_kept = 0;
  for (int64_t p = begin; p < end; ++p) {
    if (sup[p]) continue;
    kept.push_back(p);
    if (limit >= 0 && ++n_kept >= limit) break;
    const T px1 = x1[p], py1 = y1[p], px2 = x2[p], py2 = y2[p], parea = area[p];
    for (int64_t q = p + 1; q < end; ++q) {
      const T w = std::max(T(0), std::min(px2, x2[q]) - std::max(px1, x1[q]));
      const T h = std::max(T(0), std::min(py2, y2[q]) - std::max(py1, y1[q]));
      const T inter = w * h;
      const T iou = inter / (parea + area[q] - inter);
      sup[q] |= static_cast<int32_t>(iou > thr);
    }
  }
}

template <typename T>
at::Tensor nms_impl(const at::Tensor& boxes, const at::Tensor& scores, const int64_t* cats,
                    double iou_threshold, int64_t max_output, std::optional<double> score_threshold) {
  const int64_t N = boxes.size(0);
  const T* bx = boxes.data_ptr<T>();
  const T* sc = scores.data_ptr<T>();
  std::vector<int64_t> order;
  order.reserve(N);
  const T min_score = score_threshold ? threshold_above<T>(*score_threshold) : T(0);
  for (int64_t i = 0; i < N; ++i) {
    const T s = sc[i];
    bool ok = !std::isnan(s) && (!score_threshold || s >= min_score);  // +-inf scores are kept
    for (int j = 0; j < 4 && ok; ++j) ok = std::isfinite(bx[i * 4 + j]);
    if (ok) order.push_back(i);
  }
  // Category, then score descending; stable, so ties keep increasing index.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    if (cats && cats[a] != cats[b]) return cats[a] < cats[b];
    return sc[a] > sc[b];
  });
  const int64_t M = static_cast<int64_t>(order.size());
  SortedBoxes<T> sb;
  for (auto* v : {&sb.x1, &sb.y1, &sb.x2, &sb.y2, &sb.area}) v->resize(M);
  for (int64_t p = 0; p < M; ++p) {
    const T* r = bx + order[p] * 4;
    sb.x1[p] = r[0];
    sb.y1[p] = r[1];
    sb.x2[p] = r[2];
    sb.y2[p] = r[3];
    sb.area[p] = (r[2] - r[0]) * (r[3] - r[1]);
  }
  // Segments of equal category.
  std::vector<int64_t> seg{0};
  for (int64_t p = 1; p < M; ++p)
    if (cats && cats[order[p]] != cats[order[p - 1]]) seg.push_back(p);
  seg.push_back(M);
  const int64_t S = static_cast<int64_t>(seg.size()) - 1;
  std::vector<int32_t> suppressed(M, 0);
  std::vector<std::vector<int64_t>> kept(S);
  const T thr = threshold_below<T>(iou_threshold);  // iou > thr iff iou > iou_threshold
  // Categories in parallel only when there is enough work: at most n^2 / 2 IoUs per category of
  // n boxes. Below about 2^16 IoUs (some tens of microseconds) waking the other threads costs
  // more than it saves, and on a busy machine a parallel region can wait a whole scheduler time
  // slice for a descheduled thread.
  double pairs = 0.0;
  for (int64_t s = 0; s < S; ++s) {
    const double n = static_cast<double>(seg[s + 1] - seg[s]);
    pairs += 0.5 * n * n;
  }
  const auto run = [&](int64_t b, int64_t e) {
    for (int64_t s = b; s < e; ++s)
      greedy_segment(sb, seg[s], seg[s + 1], thr, max_output, suppressed, kept[s]);
  };
  if (S > 1 && pairs >= 65536.0) {
    at::parallel_for(0, S, 1, run);
  } else {
    run(0, S);
  }
  std::vector<int64_t> result;
  for (const auto& k : kept)
    for (int64_t p : k) result.push_back(order[p]);
  if (cats) {  // merge the categories: score descending, then index ascending
    std::sort(result.begin(), result.end(), [&](int64_t a, int64_t b) {
      return sc[a] != sc[b] ? sc[a] > sc[b] : a < b;
    });
  }
  if (max_output >= 0 && static_cast<int64_t>(result.size()) > max_output) result.resize(max_output);
  at::Tensor out = at::empty({static_cast<int64_t>(result.size())}, boxes.options().dtype(at::kLong));
  std::copy(result.begin(), result.end(), out.data_ptr<int64_t>());
  return out;
}

at::Tensor nms_cpu(const at::Tensor& boxes, const at::Tensor& scores,
                   const std::optional<at::Tensor>& idxs, double iou_threshold, int64_t max_output,
                   std::optional<double> score_threshold) {
  check_nms_args(boxes, scores, idxs, iou_threshold);
  TORCH_CHECK(boxes.device().is_cpu(), "nms: CPU kernel got ", boxes.device(), " boxes");
  const at::ScalarType acc = acc_dtype(boxes.scalar_type());
  const at::Tensor b = boxes.to(acc).contiguous();
  const at::Tensor s = scores.to(acc).contiguous();
  at::Tensor cats;
  if (idxs) cats = idxs->to(at::kLong).contiguous();
  at::Tensor out;
  AT_DISPATCH_FLOATING_TYPES(acc, "nms_cpu", [&] {
    out = nms_impl<scalar_t>(b, s, idxs ? cats.data_ptr<int64_t>() : nullptr, iou_threshold,
                             max_output, score_threshold);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("nms", TORCH_FN(nms_cpu));
}

}  // namespace instseg
