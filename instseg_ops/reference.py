"""Pure-PyTorch reference implementations, written from the documented semantics.

Slow (a Python loop over RoIs) and meant for tests and for checking the kernels,
not for models. Differentiable through autograd, so it also gives reference
gradients.
"""
import math
from typing import Tuple

import torch
from torch import Tensor


def _axis_samples(start: Tensor, bin_size: Tensor, pooled: int, grid: int, size: int):
    """Sample coordinates of one axis, shape [pooled, grid], in the geometry dtype."""
    p = torch.arange(pooled, dtype=start.dtype, device=start.device)[:, None]
    i = torch.arange(grid, dtype=start.dtype, device=start.device)[None, :]
    # The same association as the documented formula:
    # start + p * bin + (i + 0.5) * bin / grid
    return start + p * bin_size + (i + 0.5) * bin_size / grid


def _bilinear_1d(coord: Tensor, size: int):
    """Neighbouring pixels, weights and validity of coordinates along one axis."""
    valid = (coord >= -1.0) & (coord <= size)
    c = coord.clamp(min=0)
    lo = c.floor().long()
    at_edge = lo >= size - 1
    lo = torch.where(at_edge, torch.full_like(lo, size - 1), lo)
    hi = torch.where(at_edge, lo, lo + 1)
    c = torch.where(at_edge, lo.to(c.dtype), c)
    frac = c - lo.to(c.dtype)
    return lo, hi, 1.0 - frac, frac, valid


def roi_align_reference(
    input: Tensor,
    rois: Tensor,
    output_size: Tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign with torchvision's semantics; NaN/inf or out-of-range RoIs give zeros.

    Geometry is computed in float32 (float64 for float64 input), like the kernels;
    the interpolation itself accumulates in float64.
    """
    ph_n, pw_n = output_size
    n_img, channels, height, width = input.shape
    geo_dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    r = rois.to(geo_dtype)
    feats = input.to(torch.float64)
    out = []
    scale = torch.tensor(spatial_scale, dtype=geo_dtype)
    for k in range(r.shape[0]):
        b = float(r[k, 0])
        zero = feats.new_zeros(channels, ph_n, pw_n)
        if not math.isfinite(b) or not (-1 < b < n_img) or height == 0 or width == 0:
            out.append(zero)
            continue
        offset = 0.5 if aligned else 0.0
        x1 = r[k, 1] * scale - offset
        y1 = r[k, 2] * scale - offset
        x2 = r[k, 3] * scale - offset
        y2 = r[k, 4] * scale - offset
        roi_w, roi_h = x2 - x1, y2 - y1
        if not aligned:
            roi_w = torch.clamp(roi_w, min=1.0)
            roi_h = torch.clamp(roi_h, min=1.0)
        bin_h, bin_w = roi_h / ph_n, roi_w / pw_n
        if not all(math.isfinite(float(v)) for v in (x1, y1, x2, y2, bin_h, bin_w)):
            out.append(zero)
            continue
        if sampling_ratio > 0:
            gh = gw = sampling_ratio
        else:
            gh = max(int(math.ceil(float(roi_h / ph_n))), 0)
            gw = max(int(math.ceil(float(roi_w / pw_n))), 0)
        count = max(gh * gw, 1)
        if gh == 0 or gw == 0:
            out.append(zero)
            continue
        ys = _axis_samples(y1, bin_h, ph_n, gh, height)  # [PH, gh]
        xs = _axis_samples(x1, bin_w, pw_n, gw, width)  # [PW, gw]
        ylo, yhi, wylo, wyhi, vy = _bilinear_1d(ys, height)
        xlo, xhi, wxlo, wxhi, vx = _bilinear_1d(xs, width)
        f = feats[int(b)]  # [C, H, W]

        def gather(yi, xi):  # -> [C, PH, gh, PW, gw]
            return f[:, yi[:, :, None, None], xi[None, None, :, :]]

        wy = [w.to(torch.float64)[:, :, None, None] for w in (wylo, wyhi)]
        wx = [w.to(torch.float64)[None, None, :, :] for w in (wxlo, wxhi)]
        val = (wy[0] * wx[0] * gather(ylo, xlo) + wy[0] * wx[1] * gather(ylo, xhi)
               + wy[1] * wx[0] * gather(yhi, xlo) + wy[1] * wx[1] * gather(yhi, xhi))
        valid = (vy[:, :, None, None] & vx[None, None, :, :]).to(torch.float64)
        val = val * valid
        out.append(val.sum(dim=(2, 4)) / count)
    if not out:
        return input.new_zeros(0, channels, ph_n, pw_n)
    return torch.stack(out).to(input.dtype)


def nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, idxs: Tensor = None) -> Tensor:
    """Greedy NMS in plain Python over float32 (float64 for float64 boxes) tensors.

    Order: score descending, ties by lower index; suppress IoU > threshold (the IoU, computed in
    the working dtype, is compared with the threshold in float64); boxes of
    different categories (``idxs``) never suppress each other; non-finite boxes and NaN
    scores are dropped (+-inf scores are kept, as torchvision does).
    """
    dt = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.to(dt)
    s = scores.to(dt)
    ok = ~torch.isnan(s) & torch.isfinite(b).all(dim=1)
    cand = [i for i in range(b.shape[0]) if bool(ok[i])]
    cand.sort(key=lambda i: (-float(s[i]), i))
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    kept = []
    for i in cand:
        suppressed = False
        for j in kept:
            if idxs is not None and int(idxs[i]) != int(idxs[j]):
                continue
            w = torch.clamp(torch.minimum(b[i, 2], b[j, 2]) - torch.maximum(b[i, 0], b[j, 0]), min=0)
            h = torch.clamp(torch.minimum(b[i, 3], b[j, 3]) - torch.maximum(b[i, 1], b[j, 1]), min=0)
            inter = w * h
            if float(inter / (area[j] + area[i] - inter)) > iou_threshold:  # compared in float64
                suppressed = True
                break
        if not suppressed:
            kept.append(i)
    return torch.tensor(kept, dtype=torch.int64)


def soft_nms_reference(boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float, score_threshold: float,
                       method: str):
    """Soft-NMS (Bodla et al. 2017) in plain Python, float32 (float64 for float64 boxes) arithmetic."""
    dt = torch.float64 if boxes.dtype == torch.float64 else torch.float32
    b = boxes.to(dt)
    s = scores.to(dt).clone()
    ok = torch.isfinite(s) & torch.isfinite(b).all(dim=1) & (s.double() >= score_threshold)
    alive = [i for i in range(b.shape[0]) if bool(ok[i])]
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep, kept = [], []
    while alive:
        m = min(alive, key=lambda i: (-float(s[i]), i))
        keep.append(m)
        kept.append(s[m].clone())
        alive.remove(m)
        for i in list(alive):
            w = torch.clamp(torch.minimum(b[m, 2], b[i, 2]) - torch.maximum(b[m, 0], b[i, 0]), min=0)
            h = torch.clamp(torch.minimum(b[m, 3], b[i, 3]) - torch.maximum(b[m, 1], b[i, 1]), min=0)
            inter = w * h
            iou = inter / (area[m] + area[i] - inter)
            if method == "linear":
                if float(iou) > iou_threshold:
                    s[i] = s[i] * (1 - iou)
            else:
                s[i] = s[i] * torch.exp(-(iou * iou) / sigma)
            if not float(s[i]) >= score_threshold:
                alive.remove(i)
    kept_t = torch.stack(kept) if kept else torch.zeros(0, dtype=dt)
    return torch.tensor(keep, dtype=torch.int64), kept_t.to(scores.dtype)


def ms_deform_attn_reference(value: Tensor, spatial_shapes, sampling_locations: Tensor,
                             attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention from ``F.grid_sample``, one call per level.

    value [N, S, M, D]; spatial_shapes: (H, W) pairs (a list or an int64 Tensor[L, 2]) whose
    areas tile S in order; sampling_locations [N, Lq, M, L, P, 2], (x, y) normalised to [0, 1];
    attention_weights [N, Lq, M, L, P]. Returns [N, Lq, M * D] in the dtype of ``value``
    (computed in it: pass float64 tensors for a float64 reference).

    Semantics as the kernels: bilinear, align_corners=False, zeros off the level. NaN/inf
    locations contribute nothing and get no gradient; locations are first clamped to [-2, 3],
    which moves nothing on or near a level (any point outside (-1/2, 1 + 1/2) is off it).
    """
    import torch.nn.functional as F

    if isinstance(spatial_shapes, Tensor):
        spatial_shapes = [tuple(int(v) for v in hw) for hw in spatial_shapes.tolist()]
    n, s, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    loc = torch.where(torch.isfinite(sampling_locations), sampling_locations,
                      torch.full_like(sampling_locations, -2.0)).clamp(-2.0, 3.0)
    grid = 2.0 * loc - 1.0  # grid_sample's [-1, 1] convention
    out = value.new_zeros(n * m, d, lq)
    start = 0
    for lvl, (h, w) in enumerate(spatial_shapes):
        part = value[:, start:start + h * w]
        start += h * w
        if h * w == 0 or lq == 0:
            continue
        # [N, H*W, M, D] -> [N*M, D, H, W]
        img = part.permute(0, 2, 3, 1).reshape(n * m, d, h, w)
        # [N, Lq, M, P, 2] -> [N*M, Lq, P, 2]
        g = grid[:, :, :, lvl].permute(0, 2, 1, 3, 4).reshape(n * m, lq, n_points, 2)
        sampled = F.grid_sample(img, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        # [N*M, D, Lq, P] weighted by [N*M, 1, Lq, P]
        wts = attention_weights[:, :, :, lvl].permute(0, 2, 1, 3).reshape(n * m, 1, lq, n_points)
        out = out + (sampled * wts).sum(-1)
    if start != s:
        raise ValueError(f"ms_deform_attn_reference: the levels cover {start} rows, value has {s}")
    return out.view(n, m * d, lq).transpose(1, 2).contiguous()
