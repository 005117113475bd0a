"""Multi-level (FPN) RoIAlign: level assignment, the fused op, and a drop-in for
``torchvision.ops.MultiScaleRoIAlign``.

Torchvision and detectron2 pool from an FPN with a Python loop over levels (a
``nonzero`` per level: a host sync and a data-dependent shape). Here the level of
every RoI is computed with elementwise tensor ops (no sync) and one
``instseg::multilevel_roi_align`` call pools all RoIs from their levels (on CUDA its index
check copies four numbers to the host once, except during CUDA graph capture).
"""
import math
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2
from torch.overrides import handle_torch_function, has_torch_function_variadic

from .roi_align import (BoxesArg, _deterministic, _memory_format, _pair, _sampling_ratio, boxes_to_rois,
                        is_channels_last, roi_align)

RULES = ("fpn", "scale_adaptive")
# (h, w) per image: a Tensor[N, 2] or a list of pairs (TorchScript: List[Tuple[int, int]]).
ImageSizes = Union[Tensor, List[Tuple[int, int]]]


def _boxes_xyxy(boxes: BoxesArg) -> Tensor:
    if isinstance(boxes, Tensor):
        if boxes.dim() == 2 and boxes.shape[1] == 5:
            return boxes[:, 1:]
        if boxes.dim() == 2 and boxes.shape[1] == 4:
            return boxes
        raise ValueError(f"assign_levels: boxes must be Tensor[K, 4], Tensor[K, 5] or a list, got {boxes.shape}")
    return torch.cat(boxes, dim=0)


def _image_area_per_box(boxes: BoxesArg, image_sizes: ImageSizes, dtype: torch.dtype) -> Tensor:
    """Area (h * w), in ``dtype``, of the image each box belongs to."""
    if isinstance(image_sizes, Tensor):
        sizes = image_sizes
    else:
        hw: List[List[float]] = []
        for size in image_sizes:
            hw.append([float(size[0]), float(size[1])])
        sizes = torch.tensor(hw)
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError("assign_levels: the scale_adaptive rule needs Tensor[K, 5] boxes (with batch indices) "
                             "or a list of Tensor[L, 4], one per image")
        sizes = sizes.to(device=boxes.device, dtype=dtype)
        area = sizes[:, 0] * sizes[:, 1]
        # Out-of-range or NaN batch indices are clamped here; the op then rejects them.
        return area[boxes[:, 0].nan_to_num(0.0).clamp(0, area.shape[0] - 1).long()]
    if len(boxes) != sizes.shape[0]:
        raise ValueError(f"assign_levels: {len(boxes)} box lists but {sizes.shape[0]} image sizes")
    parts: List[Tensor] = []
    for i, b in enumerate(boxes):
        parts.append(torch.full((b.shape[0],), float(sizes[i, 0] * sizes[i, 1]), dtype=dtype, device=b.device))
    return torch.cat(parts)


def assign_levels(
    boxes: BoxesArg,
    min_level: int,
    max_level: int,
    rule: str = "fpn",
    canonical_scale: float = 224.0,
    canonical_level: float = 4.0,
    eps: float = 1e-6,
    image_sizes: Optional[ImageSizes] = None,
) -> Tensor:
    """FPN level of each box, as an int64 index relative to ``min_level``.

    ``"fpn"`` (torchvision's LevelMapper, Lin et al. 2017, eq. 1):
        ``floor(canonical_level + log2(sqrt(area) / canonical_scale) + eps)``
    ``"scale_adaptive"`` (CenterMask, Lee & Park 2020):
        ``ceil(max_level - log2(image_area / area))``, which needs ``image_sizes``
        ((h, w) per image, a list or Tensor[N, 2]).
    Both are clamped to ``[min_level, max_level]``; boxes with a NaN area go to
    ``min_level``. Computed with elementwise ops only, in the boxes' dtype for ``"fpn"`` (as
    torchvision does) and in at least float32 for ``"scale_adaptive"``. Scriptable, and a leaf of
    ``torch.fx.symbolic_trace``.
    """
    if has_torch_function_variadic(boxes, image_sizes):
        return handle_torch_function(_ORIGINAL["assign_levels"], (boxes, image_sizes), boxes, min_level, max_level,
                                     rule, canonical_scale, canonical_level, eps, image_sizes)
    if rule != "fpn" and rule != "scale_adaptive":
        raise ValueError(f"assign_levels: rule must be one of ('fpn', 'scale_adaptive'), got '{rule}'")
    if max_level < min_level:
        raise ValueError(f"assign_levels: max_level {max_level} < min_level {min_level}")
    xyxy = _boxes_xyxy(boxes)
    area = (xyxy[:, 2] - xyxy[:, 0]) * (xyxy[:, 3] - xyxy[:, 1])
    if rule == "fpn":
        s = torch.sqrt(area)
        k = torch.floor(canonical_level + torch.log2(s / canonical_scale) + torch.tensor(eps, dtype=s.dtype))
    else:
        if image_sizes is None:
            raise ValueError("assign_levels: the scale_adaptive rule needs image_sizes")
        # At least float32: a float16 image area (e.g. 800 x 1216) overflows.
        dt = torch.promote_types(area.dtype, torch.float32)
        x = xyxy.to(dt)
        area = (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])
        k = torch.ceil(max_level - torch.log2(_image_area_per_box(boxes, image_sizes, dt) / area))
    k = torch.nan_to_num(k, nan=float(min_level))
    k = torch.clamp(k, min=min_level, max=max_level)
    return k.to(torch.int64) - min_level


def _log2(v: float) -> float:
    # TorchScript has no math.log2; only rounded to an integer here, so the last bit does not matter.
    return math.log(v) / math.log(2.0)


def _default_levels(spatial_scales: List[float]) -> Tuple[int, int]:
    return int(round(-_log2(spatial_scales[0]))), int(round(-_log2(spatial_scales[-1])))


def multilevel_roi_align(
    features: List[Tensor],
    boxes: BoxesArg,
    output_size: BroadcastingList2[int],
    spatial_scales: List[float],
    sampling_ratio: int = -1,
    aligned: bool = False,
    levels: Optional[Tensor] = None,
    rule: str = "fpn",
    min_level: Optional[int] = None,
    max_level: Optional[int] = None,
    canonical_scale: float = 224.0,
    canonical_level: float = 4.0,
    eps: float = 1e-6,
    image_sizes: Optional[ImageSizes] = None,
    deterministic: Optional[bool] = None,
) -> Tensor:
    """RoIAlign of every RoI from its FPN level, in one op. Output Tensor[K, C, h, w] in RoI order.

    ``features``: Tensor[N, C, H_l, W_l] per level (finest first), ``spatial_scales``
    their scales (e.g. 1/4, 1/8, ...). ``levels`` (int64 Tensor[K], index into
    ``features``) is computed with :func:`assign_levels` when not given;
    ``min_level``/``max_level`` default to ``-log2`` of the first/last scale.
    Scriptable, and a leaf of ``torch.fx.symbolic_trace``.
    """
    if has_torch_function_variadic(features[0], boxes, levels):
        return handle_torch_function(_ORIGINAL["multilevel_roi_align"], (features[0], boxes, levels), features, boxes,
                                     output_size, spatial_scales, sampling_ratio, aligned, levels, rule, min_level,
                                     max_level, canonical_scale, canonical_level, eps, image_sizes, deterministic)
    features = list(features)
    rois = boxes_to_rois(boxes, features[0])
    ph, pw = _pair(output_size)
    scales = [float(s) for s in spatial_scales]
    if levels is None:
        lo, hi = _default_levels(scales)
        lo = lo if min_level is None else min_level
        hi = hi if max_level is None else max_level
        levels = assign_levels(rois, lo, hi, rule, canonical_scale, canonical_level, eps, image_sizes)
    return torch.ops.instseg.multilevel_roi_align(features, rois, levels, scales, ph, pw,
                                                  _sampling_ratio(sampling_ratio), bool(aligned),
                                                  _deterministic(deterministic))


def _infer_scale(feature: Tensor, original_size: List[int]) -> float:
    # Power of two closest to feature size / image size (along the height).
    approx = float(feature.shape[-2]) / float(original_size[0])
    return 2.0 ** float(round(_log2(approx)))


def _multiscale_roi_align(x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]],
                          featmap_names: List[str], output_size: BroadcastingList2[int], sampling_ratio: int,
                          canonical_scale: float, canonical_level: float, rule: str, aligned: bool,
                          deterministic: Optional[bool]) -> Tensor:
    """MultiScaleRoIAlign's forward; a function of its own so that torch.fx records it as one node."""
    # As torchvision: the maps of x (in its order) whose names are listed; others are ignored.
    features: List[Tensor] = []
    for k, v in x.items():
        if k in featmap_names:
            features.append(v)
    if len(features) == 0:
        raise ValueError("MultiScaleRoIAlign: none of featmap_names is in the input")
    max_h = 0
    max_w = 0
    for size in image_shapes:
        max_h = max(max_h, int(size[0]))
        max_w = max(max_w, int(size[1]))
    scales = [_infer_scale(f, [max_h, max_w]) for f in features]
    if len(features) == 1:
        return roi_align(features[0], boxes, output_size, scales[0], sampling_ratio, aligned, deterministic)
    lvl_min, lvl_max = _default_levels(scales)
    return multilevel_roi_align(features, boxes, output_size, scales, sampling_ratio, aligned, None, rule, lvl_min,
                                lvl_max, canonical_scale, canonical_level, 1e-6, image_shapes, deterministic)


torch.fx.wrap("assign_levels")
torch.fx.wrap("multilevel_roi_align")
torch.fx.wrap("_multiscale_roi_align")


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``, fused into one op.

    Same constructor and ``forward(x, boxes, image_shapes)``; scales are inferred
    from the feature and image sizes as torchvision does. Extra options: the level
    ``rule`` ("fpn" or "scale_adaptive"), ``aligned`` and ``deterministic``.
    Scriptable; under ``torch.fx.symbolic_trace`` its pooling is one node.
    """

    def __init__(self, featmap_names: List[str], output_size: BroadcastingList2[int], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4, rule: str = "fpn",
                 aligned: bool = False, deterministic: Optional[bool] = None):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        if rule not in RULES:
            raise ValueError(f"MultiScaleRoIAlign: rule must be one of {RULES}, got {rule!r}")
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level
        self.rule = rule
        self.aligned = aligned
        self.deterministic = deterministic

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        return _multiscale_roi_align(x, boxes, image_shapes, self.featmap_names, self.output_size,
                                     self.sampling_ratio, float(self.canonical_scale), float(self.canonical_level),
                                     self.rule, self.aligned, self.deterministic)

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}, rule={self.rule!r}, aligned={self.aligned}")


# ---------------------------------------------------------------------------
# Fake kernels and autograd


@torch.library.register_fake("instseg::multilevel_roi_align")
def _multilevel_fake(features, rois, levels, spatial_scales, pooled_height, pooled_width, sampling_ratio, aligned,
                     deterministic=False):
    torch._check(len(features) >= 1, lambda: "multilevel_roi_align: no feature maps")
    torch._check(len(spatial_scales) == len(features), lambda: "multilevel_roi_align: one spatial_scale per level")
    f0 = features[0]
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "multilevel_roi_align: rois must be a Tensor[K, 5]")
    torch._check(levels.dim() == 1 and levels.shape[0] == rois.shape[0],
                 lambda: "multilevel_roi_align: levels must be a Tensor[K]")
    for f in features[1:]:
        torch._check(f.dtype == f0.dtype and f.device == f0.device,
                     lambda: "multilevel_roi_align: all levels must have one dtype and device")
    return torch.empty((rois.shape[0], f0.shape[1], pooled_height, pooled_width), dtype=f0.dtype, device=f0.device,
                       memory_format=_memory_format(is_channels_last(f0)))


@torch.library.register_fake("instseg::_multilevel_roi_align_backward")
def _multilevel_backward_fake(grad, rois, levels, spatial_scales, pooled_height, pooled_width, level_sizes,
                              sampling_ratio, aligned, channels_last, deterministic):
    n, c = level_sizes[0], level_sizes[1]
    return [torch.empty((n, c, level_sizes[2 + 2 * i], level_sizes[3 + 2 * i]), dtype=grad.dtype, device=grad.device,
                        memory_format=_memory_format(channels_last)) for i in range(len(spatial_scales))]


def _setup_context(ctx, inputs, output):
    features, rois, levels, spatial_scales, ph, pw, sampling_ratio, aligned, deterministic = inputs
    ctx.save_for_backward(rois, levels)
    ctx.args = (list(spatial_scales), ph, pw, sampling_ratio, aligned, deterministic)
    sizes = [features[0].shape[0], features[0].shape[1]]
    for f in features:
        sizes += [f.shape[2], f.shape[3]]
    ctx.level_sizes = sizes
    ctx.channels_last = is_channels_last(features[0])


def _backward(ctx, grad):
    rois, levels = ctx.saved_tensors
    spatial_scales, ph, pw, sampling_ratio, aligned, deterministic = ctx.args
    grads = torch.ops.instseg._multilevel_roi_align_backward(
        grad, rois, levels, spatial_scales, ph, pw, ctx.level_sizes, sampling_ratio, aligned, ctx.channels_last,
        deterministic)
    return list(grads), None, None, None, None, None, None, None, None


torch.library.register_autograd("instseg::multilevel_roi_align", _backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    grad, rois, levels, spatial_scales, ph, pw, level_sizes, sampling_ratio, aligned, _cl, deterministic = inputs
    ctx.save_for_backward(rois, levels)
    ctx.args = (list(spatial_scales), ph, pw, sampling_ratio, aligned, deterministic)
    ctx.shapes = [(level_sizes[0], level_sizes[1], level_sizes[2 + 2 * i], level_sizes[3 + 2 * i])
                  for i in range(len(spatial_scales))]


def _backward_backward(ctx, grad_grads):
    rois, levels = ctx.saved_tensors
    spatial_scales, ph, pw, sampling_ratio, aligned, deterministic = ctx.args
    ref = next(g for g in grad_grads if g is not None)
    gg = [g if g is not None else ref.new_zeros(shape) for g, shape in zip(grad_grads, ctx.shapes)]
    out = torch.ops.instseg.multilevel_roi_align(gg, rois, levels, spatial_scales, ph, pw, sampling_ratio, aligned,
                                                 deterministic)
    return (out,) + (None,) * 10


torch.library.register_autograd("instseg::_multilevel_roi_align_backward", _backward_backward,
                                setup_context=_backward_setup_context)

# The functions themselves, for FX nodes (torch.fx.wrap patches this module's globals while
# tracing, and a node whose target were that patch could not be scripted).
_ORIGINAL = {"assign_levels": assign_levels, "multilevel_roi_align": multilevel_roi_align}
