// Mask pasting on the CPU: masks in parallel (at::parallel_for), work
// proportional to the masks' clipped regions. Canvases come from lazy_zeros, so
// background pixels are never written (large outputs are zero pages until
// touched). Per output row, the y-blend of the mask row pair is computed once
// for all source columns; each pixel is then one x-blend of two cached values
// (the same expression as the CUDA kernel, see paste_masks_common.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <optional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define INSTSEG_HAVE_F16C_PATH 1
#endif

#include "../paste_masks_checks.h"
#include "../paste_masks_common.h"
#include "lazy_zeros.h"

namespace instseg {
namespace {

using namespace paste_detail;

struct PasteParams {
  int64_t M, pad, H, W;
  bool aligned;
  bool binary;      // bool output: value >= threshold
  float threshold;  // threshold_as_float of the requested threshold
};

Region region_of(const float* box, const PasteParams& p) {
  return p.aligned ? aligned_geometry(box, p.M, p.H, p.W).region : tv_geometry(box, p.M, p.pad, p.H, p.W).region;
}

template <typename out_t>
inline out_t convert(float v, const PasteParams& p) {
  if constexpr (std::is_same<out_t, bool>::value) {
    return v >= p.threshold;
  } else {
    return static_cast<out_t>(v);
  }
}

// float -> float16 for a row of output pixels. c10::Half's conversion is
// portable bit manipulation (several ns a value, the larger part of a float16
// paste); x86 CPUs with F16C convert 8 values per instruction with the same
// round-to-nearest-even result (NaN payloads aside), chosen at run time.
#ifdef INSTSEG_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) void floats_to_half_f16c(const float* src, c10::Half* dst, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i), h);
  }
  for (; i < n; ++i) dst[i] = c10::Half(src[i]);
}

bool cpu_has_f16c() {
  static const bool has = __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

void floats_to_half(const float* src, c10::Half* dst, int64_t n) {
#ifdef INSTSEG_HAVE_F16C_PATH
  if (cpu_has_f16c()) {
    floats_to_half_f16c(src, dst, n);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) dst[i] = c10::Half(src[i]);
}

// Writes mask `mask`'s region; `dst` is the region's top-left pixel and rows
// are `stride` elements apart.
template <typename scalar_t, typename out_t>
void paste_one(const scalar_t* mask, const float* box, const PasteParams& p, out_t* dst, int64_t stride) {
  Region r;
  int64_t bx = 0, by = 0, pad = 0;
  float sx = 1.f, sy = 1.f;
  AlignedPaste ag{};
  if (p.aligned) {
    ag = aligned_geometry(box, p.M, p.H, p.W);
    r = ag.region;
  } else {
    const TvPaste g = tv_geometry(box, p.M, p.pad, p.H, p.W);
    r = g.region;
    bx = g.bx;
    by = g.by;
    sx = g.sx;
    sy = g.sy;
    pad = p.pad;
  }
  if (r.empty()) return;
  const int64_t P = p.M + 2 * pad;
  auto tap_x = [&](int64_t x) { return p.aligned ? aligned_tap(x, ag.x0, ag.x1, p.M) : tv_tap(sx, x - bx, P); };
  auto tap_y = [&](int64_t y) { return p.aligned ? aligned_tap(y, ag.y0, ag.y1, p.M) : tv_tap(sy, y - by, P); };
  const int64_t w = r.x1 - r.x0;
  std::vector<Tap> cols(w);
  for (int64_t x = r.x0; x < r.x1; ++x) cols[x - r.x0] = tap_x(x);
  // Cached y-blend of the row pair for source columns -1 .. P + 1 (index c + 1):
  // aligned taps reach columns -1 .. M + 1.
  std::vector<float> blended(P + 3);
  constexpr bool kHalfOut = std::is_same<out_t, c10::Half>::value;
  std::vector<float> row_values(kHalfOut ? w : 0);  // float16: a row's values, converted together
  for (int64_t y = r.y0; y < r.y1; ++y) {
    out_t* row = dst + (y - r.y0) * stride;
    const Tap ty = tap_y(y);
    if (!ty.valid) {
      for (int64_t i = 0; i < w; ++i) row[i] = convert<out_t>(0.f, p);
      continue;
    }
    for (int64_t c = -1; c <= P + 1; ++c) blended[c + 1] = column_value(mask, p.M, pad, ty, c);
    const float* b = blended.data() + 1;
    if constexpr (kHalfOut) {
      float* vals = row_values.data();
      for (int64_t i = 0; i < w; ++i) {
        const Tap& tx = cols[i];
        vals[i] = tx.valid ? lerp2(tx.l1, b[tx.i0], b[tx.i1]) : 0.f;
      }
      floats_to_half(vals, row, w);
    } else {
      for (int64_t i = 0; i < w; ++i) {
        const Tap& tx = cols[i];
        const float v = tx.valid ? lerp2(tx.l1, b[tx.i0], b[tx.i1]) : 0.f;
        row[i] = convert<out_t>(v, p);
      }
    }
  }
}

// The masks with a positive cost(n) (those with a non-empty region), largest first.
template <typename Cost>
std::vector<int64_t> largest_first(int64_t N, const Cost& cost_of) {
  std::vector<int64_t> order;
  std::vector<int64_t> cost(N);
  order.reserve(N);
  for (int64_t n = 0; n < N; ++n) {
    cost[n] = cost_of(n);
    if (cost[n] > 0) order.push_back(n);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t c) { return cost[a] > cost[c]; });
  return order;
}

// Calls fn(n) for every n in `order`, the threads taking the next mask as they finish one:
// region sizes span orders of magnitude, so equal index ranges per thread would leave one
// thread with most of the pixels (largest first keeps the last one to finish short).
template <typename Fn>
void for_each_balanced(const std::vector<int64_t>& order, const Fn& fn) {
  const int64_t count = static_cast<int64_t>(order.size());
  std::atomic<int64_t> next{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), count), 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < count; i = next.fetch_add(1)) fn(order[i]);
  });
}

PasteParams params_of(const at::Tensor& masks, int64_t H, int64_t W, int64_t padding,
                      std::optional<double> threshold, bool aligned) {
  return PasteParams{masks.size(1), aligned ? 0 : padding, H, W, aligned, threshold.has_value(),
                     threshold ? threshold_as_float(*threshold) : 0.f};
}

at::Tensor paste_masks_cpu(const at::Tensor& masks_, const at::Tensor& boxes_, int64_t H, int64_t W,
                           int64_t padding, std::optional<double> threshold, bool aligned) {
  check_paste_args(masks_, boxes_, H, W, padding, threshold);
  TORCH_CHECK(masks_.device().is_cpu(), "paste_masks: CPU kernel got ", masks_.device(), " masks");
  const at::Tensor masks = masks_.contiguous();
  const at::Tensor boxes = boxes_.to(at::kFloat).contiguous();
  const int64_t N = masks.size(0);
  const PasteParams p = params_of(masks, H, W, padding, threshold, aligned);
  bool lazy = false;
  at::Tensor out = lazy_zeros({N, H, W}, threshold ? at::kBool : masks.scalar_type(), &lazy);
  // Pixels no mask reaches have probability 0: with a threshold <= 0 they pass.
  if (p.binary && p.threshold <= 0.f) out.fill_(true);
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks.scalar_type(), "paste_masks_cpu", [&] {
    const scalar_t* m = masks.const_data_ptr<scalar_t>();
    const float* b = boxes.const_data_ptr<float>();
    const int64_t MM = p.M * p.M;
    std::vector<Region> regions(N);
    for (int64_t n = 0; n < N; ++n) regions[n] = region_of(b + n * 4, p);
    // On a lazily zeroed canvas a mask's cost is mostly faulting in the pages of its rows.
    const std::vector<int64_t> order = largest_first(N, [&](int64_t n) {
      const Region& r = regions[n];
      return r.empty() ? 0 : lazy ? (r.y1 - r.y0) * W : r.area();
    });
    auto run = [&](auto* canvas) {
      for_each_balanced(order, [&](int64_t n) {
        const Region& r = regions[n];
        auto* dst = canvas + n * H * W + r.y0 * W + r.x0;
        // Lazily zeroed canvas: fault in the pages of the region's rows in one call.
        if (lazy) populate_for_write(dst, static_cast<size_t>((r.y1 - r.y0 - 1) * W + (r.x1 - r.x0)) * sizeof(*dst));
        paste_one(m + n * MM, b + n * 4, p, dst, W);
      });
    };
    if (threshold) run(out.mutable_data_ptr<bool>());
    else run(out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> paste_masks_crops_cpu(
    const at::Tensor& masks_, const at::Tensor& boxes_, int64_t H, int64_t W, int64_t padding,
    std::optional<double> threshold, bool aligned) {
  check_paste_args(masks_, boxes_, H, W, padding, threshold);
  TORCH_CHECK(masks_.device().is_cpu(), "paste_masks_crops: CPU kernel got ", masks_.device(), " masks");
  const at::Tensor masks = masks_.contiguous();
  const at::Tensor boxes = boxes_.to(at::kFloat).contiguous();
  const int64_t N = masks.size(0);
  const PasteParams p = params_of(masks, H, W, padding, threshold, aligned);
  at::Tensor regions = at::empty({N, 4}, at::TensorOptions().dtype(at::kLong));
  at::Tensor offsets = at::empty({N + 1}, at::TensorOptions().dtype(at::kLong));
  int64_t* reg = regions.mutable_data_ptr<int64_t>();
  int64_t* off = offsets.mutable_data_ptr<int64_t>();
  const float* b = boxes.const_data_ptr<float>();
  off[0] = 0;
  for (int64_t n = 0; n < N; ++n) {
    Region r = region_of(b + n * 4, p);
    if (r.empty()) r = Region{0, 0, 0, 0};
    reg[4 * n] = r.x0;
    reg[4 * n + 1] = r.y0;
    reg[4 * n + 2] = r.x1;
    reg[4 * n + 3] = r.y1;
    off[n + 1] = off[n] + r.area();
  }
  at::Tensor data = at::empty({off[N]}, masks.options().dtype(threshold ? at::kBool : masks.scalar_type()));
  if (data.numel() == 0) return {data, regions, offsets};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks.scalar_type(), "paste_masks_crops_cpu", [&] {
    const scalar_t* m = masks.const_data_ptr<scalar_t>();
    const int64_t MM = p.M * p.M;
    // Crop n's size is its region's area (0 when empty), already summed into the offsets.
    const std::vector<int64_t> order = largest_first(N, [&](int64_t n) { return off[n + 1] - off[n]; });
    auto run = [&](auto* flat) {
      for_each_balanced(order, [&](int64_t n) {
        paste_one(m + n * MM, b + n * 4, p, flat + off[n], reg[4 * n + 2] - reg[4 * n]);
      });
    };
    if (threshold) run(data.mutable_data_ptr<bool>());
    else run(data.mutable_data_ptr<scalar_t>());
  });
  return {data, regions, offsets};
}

// ------------------------------------------------------------------- backward
// The gradient of mask `mask_out` (M x M, written in full) from the incoming
// gradient of its region: `g` is the region's top-left pixel, rows `stride`
// apart. Per region row: the row's contributions to every padded column (the
// x-sum S_y of paste_masks_common.h, scattered pixel by pixel in ascending x),
// then added to the one or two mask rows its y taps reach.
template <typename scalar_t>
void paste_backward_one(const scalar_t* g, int64_t stride, const float* box, const PasteParams& p,
                        scalar_t* mask_out) {
  using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
  const int64_t M = p.M;
  Region r;
  PasteAxis ax, ay;
  if (p.aligned) {
    const AlignedPaste ag = aligned_geometry(box, M, p.H, p.W);
    r = ag.region;
    ax = aligned_axis(ag.x0, ag.x1, M);
    ay = aligned_axis(ag.y0, ag.y1, M);
  } else {
    const TvPaste tg = tv_geometry(box, M, p.pad, p.H, p.W);
    r = tg.region;
    ax = tv_axis(tg.sx, tg.bx, M, p.pad);
    ay = tv_axis(tg.sy, tg.by, M, p.pad);
  }
  std::vector<acc_t> acc(M * M, acc_t(0));
  if (!r.empty()) {
    const int64_t pad = p.aligned ? 0 : p.pad, P = ax.P, w = r.x1 - r.x0;
    std::vector<Tap> cols(w);
    for (int64_t x = r.x0; x < r.x1; ++x) cols[x - r.x0] = ax.tap(x);
    // S_y for padded columns -1 .. P + 1 (index c + 1): aligned taps reach -1 .. M + 1.
    std::vector<acc_t> row(P + 3);
    for (int64_t y = r.y0; y < r.y1; ++y) {
      const Tap ty = ay.tap(y);
      if (!ty.valid) continue;
      std::fill(row.begin(), row.end(), acc_t(0));
      const scalar_t* gy = g + (y - r.y0) * stride;
      for (int64_t i = 0; i < w; ++i) {
        const Tap& tx = cols[i];
        if (!tx.valid) continue;
        const acc_t v = static_cast<acc_t>(gy[i]);
        row[tx.i0 + 1] = add_tap_terms(row[tx.i0 + 1], tx, tx.i0, v);
        if (tx.i1 != tx.i0) row[tx.i1 + 1] = add_tap_terms(row[tx.i1 + 1], tx, tx.i1, v);
      }
      const acc_t* s = row.data() + 1 + pad;  // mask column c is padded column c + pad
      const int64_t rows[2] = {ty.i0, ty.i1};
      for (int k = 0; k < (ty.i1 == ty.i0 ? 1 : 2); ++k) {
        const int64_t mr = rows[k] - pad;
        if (mr < 0 || mr >= M) continue;
        acc_t* out_row = acc.data() + mr * M;
        for (int64_t c = 0; c < M; ++c) out_row[c] = add_tap_terms(out_row[c], ty, rows[k], s[c]);
      }
    }
  }
  for (int64_t i = 0; i < M * M; ++i) mask_out[i] = static_cast<scalar_t>(acc[i]);
}

void check_backward_grad(const at::Tensor& grad, const at::Tensor& masks, const char* name) {
  TORCH_CHECK(grad.scalar_type() == masks.scalar_type(), name, ": the gradient is ", grad.scalar_type(),
              " but the masks are ", masks.scalar_type());
  TORCH_CHECK(grad.device() == masks.device(), name, ": the gradient is on ", grad.device(),
              " but the masks are on ", masks.device());
}

// Runs paste_backward_one for every mask (largest region first); grad_of(n)
// gives mask n's (region top-left pixel, row stride) in the incoming gradient.
template <typename GradOf>
at::Tensor paste_backward_all(const at::Tensor& masks, const at::Tensor& boxes, const PasteParams& p,
                              const std::vector<Region>& regions, const GradOf& grad_of, const at::Tensor& grad) {
  const int64_t N = masks.size(0), MM = p.M * p.M;
  at::Tensor out = at::empty(masks.sizes(), masks.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, masks.scalar_type(), "paste_masks_backward_cpu", [&] {
    const scalar_t* g = grad.const_data_ptr<scalar_t>();
    const float* b = boxes.const_data_ptr<float>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Every mask is written (masks that paste nothing get zeros): cost area + 1.
    const std::vector<int64_t> order = largest_first(N, [&](int64_t n) { return regions[n].area() + 1; });
    for_each_balanced(order, [&](int64_t n) {
      const auto [offset, stride] = grad_of(n);
      paste_backward_one(g + offset, stride, b + n * 4, p, o + n * MM);
    });
  });
  return out;
}

at::Tensor paste_masks_backward_cpu(const at::Tensor& grad_, const at::Tensor& masks, const at::Tensor& boxes_,
                                    int64_t H, int64_t W, int64_t padding, bool aligned) {
  check_paste_args(masks, boxes_, H, W, padding, std::nullopt);
  TORCH_CHECK(masks.device().is_cpu(), "paste_masks backward: CPU kernel got ", masks.device(), " masks");
  check_backward_grad(grad_, masks, "paste_masks backward");
  const int64_t N = masks.size(0);
  TORCH_CHECK(grad_.dim() == 3 && grad_.size(0) == N && grad_.size(1) == H && grad_.size(2) == W,
              "paste_masks backward: the gradient must be a Tensor[", N, ", ", H, ", ", W, "], got shape ",
              grad_.sizes());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor boxes = boxes_.to(at::kFloat).contiguous();
  const PasteParams p = params_of(masks, H, W, padding, std::nullopt, aligned);
  std::vector<Region> regions(N);
  const float* b = boxes.const_data_ptr<float>();
  for (int64_t n = 0; n < N; ++n) regions[n] = region_of(b + n * 4, p);
  return paste_backward_all(masks, boxes, p, regions, [&](int64_t n) {
    const Region& r = regions[n];
    return std::pair<int64_t, int64_t>(r.empty() ? 0 : (n * H + r.y0) * W + r.x0, W);
  }, grad);
}

at::Tensor paste_masks_crops_backward_cpu(const at::Tensor& grad_, const at::Tensor& masks,
                                          const at::Tensor& boxes_, const at::Tensor& regions_,
                                          const at::Tensor& offsets_, int64_t H, int64_t W, int64_t padding,
                                          bool aligned) {
  constexpr const char* kName = "paste_masks_crops backward";
  check_paste_args(masks, boxes_, H, W, padding, std::nullopt);
  TORCH_CHECK(masks.device().is_cpu(), kName, ": CPU kernel got ", masks.device(), " masks");
  check_backward_grad(grad_, masks, kName);
  const int64_t N = masks.size(0);
  TORCH_CHECK(regions_.dim() == 2 && regions_.size(0) == N && regions_.size(1) == 4 &&
                  regions_.scalar_type() == at::kLong && offsets_.dim() == 1 && offsets_.size(0) == N + 1 &&
                  offsets_.scalar_type() == at::kLong,
              kName, ": regions must be an int64 Tensor[", N, ", 4] and offsets an int64 Tensor[", N + 1,
              "], got ", regions_.scalar_type(), " ", regions_.sizes(), " and ", offsets_.scalar_type(), " ",
              offsets_.sizes());
  TORCH_CHECK(regions_.device() == masks.device() && offsets_.device() == masks.device(), kName,
              ": regions and offsets must be on the masks' device ", masks.device());
  TORCH_CHECK(grad_.dim() == 1, kName, ": the gradient must be 1-D, got shape ", grad_.sizes());
  const at::Tensor grad = grad_.contiguous();
  const at::Tensor boxes = boxes_.to(at::kFloat).contiguous();
  const at::Tensor regions_t = regions_.contiguous(), offsets_t = offsets_.contiguous();
  const int64_t* reg = regions_t.const_data_ptr<int64_t>();
  const int64_t* off = offsets_t.const_data_ptr<int64_t>();
  const PasteParams p = params_of(masks, H, W, padding, std::nullopt, aligned);
  std::vector<Region> regions(N);
  const float* b = boxes.const_data_ptr<float>();
  TORCH_CHECK(off[0] == 0, kName, ": offsets[0] must be 0, got ", off[0]);
  for (int64_t n = 0; n < N; ++n) {
    Region r = region_of(b + n * 4, p);
    if (r.empty()) r = Region{0, 0, 0, 0};
    TORCH_CHECK(reg[4 * n] == r.x0 && reg[4 * n + 1] == r.y0 && reg[4 * n + 2] == r.x1 && reg[4 * n + 3] == r.y1,
                kName, ": region (", reg[4 * n], ", ", reg[4 * n + 1], ", ", reg[4 * n + 2], ", ", reg[4 * n + 3],
                ") of mask ", n, " differs from the geometry's (", r.x0, ", ", r.y0, ", ", r.x1, ", ", r.y1, ")");
    TORCH_CHECK(off[n + 1] - off[n] == r.area(), kName, ": offsets of mask ", n, " span ", off[n + 1] - off[n],
                " values, its region has ", r.area());
    regions[n] = r;
  }
  TORCH_CHECK(grad.numel() == off[N], kName, ": the gradient has ", grad.numel(), " values, the crops ", off[N]);
  return paste_backward_all(masks, boxes, p, regions, [&](int64_t n) {
    return std::pair<int64_t, int64_t>(off[n], regions[n].x1 - regions[n].x0);
  }, grad);
}

}  // namespace

TORCH_LIBRARY_IMPL(instseg, CPU, m) {
  m.impl("paste_masks", TORCH_FN(paste_masks_cpu));
  m.impl("paste_masks_crops", TORCH_FN(paste_masks_crops_cpu));
  m.impl("_paste_masks_backward", TORCH_FN(paste_masks_backward_cpu));
  m.impl("_paste_masks_crops_backward", TORCH_FN(paste_masks_crops_backward_cpu));
}

}  // namespace instseg
