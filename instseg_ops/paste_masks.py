"""Pasting per-RoI masks into image canvases, or into crops of them (CPU and CUDA kernels)."""
import math
from typing import List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic


def paste_masks(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], padding: int = 1,
                threshold: Optional[float] = None, aligned: bool = False) -> Tensor:
    """Pastes ``masks`` (Tensor[N, M, M] or [N, 1, M, M]) into Tensor[N, H, W] canvases.

    ``aligned=False``: torchvision's ``paste_masks_in_image`` (pad by ``padding``, expand the box
    by the same ratio, integer box, bilinear resize with align_corners=False, clip to the image);
    a box wholly outside the image pastes nothing (torchvision raises for boxes above/left).
    ``aligned=True``: detectron2's ``grid_sample`` pasting (sub-pixel box, pixel centres at +0.5,
    zeros outside the mask). With ``threshold`` the result is bool ``value >= threshold`` and no
    float canvas is allocated (the float32 value is compared with the threshold rounded to float32).
    Boxes with a non-finite coordinate, or whose expanded box is not finite, paste nothing.
    Differentiable with respect to ``masks`` (probability output), as torchvision's paste.
    Scriptable, and a leaf of ``torch.fx.symbolic_trace``.
    """
    if has_torch_function_variadic(masks, boxes):
        return handle_torch_function(_ORIGINAL["paste_masks"], (masks, boxes), masks, boxes, image_size, padding,
                                     threshold, aligned)
    masks = _squeeze_channel(masks)
    h, w = int(image_size[0]), int(image_size[1])
    return torch.ops.instseg.paste_masks(masks, boxes, h, w, int(padding),
                                         None if threshold is None else float(threshold), bool(aligned))


def paste_masks_crops(masks: Tensor, boxes: Tensor, image_size: Tuple[int, int], padding: int = 1,
                      threshold: Optional[float] = None, aligned: bool = False) -> Tuple[List[Tensor], Tensor]:
    """Like :func:`paste_masks`, without the N x H x W canvases.

    Returns ``(crops, regions)``: ``regions`` is an int64 Tensor[N, 4] ``(x0, y0, x1, y1)``,
    the clipped pixels ``[y0, y1) x [x0, x1)`` mask ``n`` may write, and ``crops[n]`` is
    Tensor[y1 - y0, x1 - x0] with exactly the values of ``paste_masks(...)[n, y0:y1, x0:x1]``;
    outside the region the canvas holds probability 0 (False with a threshold > 0, True with a
    threshold <= 0). An empty region is ``(0, 0, 0, 0)`` with a
    0 x 0 crop. Memory is the sum of the regions' areas (in torchvision mode: the clipped
    integer boxes), so hundreds of masks on a 12-megapixel image stay small. The crops are
    views into one buffer; on CUDA the call synchronises once (for the buffer's size).
    Scriptable, and a leaf of ``torch.fx.symbolic_trace``.
    """
    if has_torch_function_variadic(masks, boxes):
        return handle_torch_function(_ORIGINAL["paste_masks_crops"], (masks, boxes), masks, boxes, image_size, padding,
                                     threshold, aligned)
    masks = _squeeze_channel(masks)
    h, w = int(image_size[0]), int(image_size[1])
    data, regions, offsets = torch.ops.instseg.paste_masks_crops(
        masks, boxes, h, w, int(padding), None if threshold is None else float(threshold), bool(aligned))
    n = regions.shape[0]
    host: List[int] = torch.cat([regions.flatten(), offsets]).tolist()  # one device-to-host copy
    reg, starts = host[:4 * n], host[4 * n:]
    crops = [data[starts[i]:starts[i + 1]].view(reg[4 * i + 3] - reg[4 * i + 1], reg[4 * i + 2] - reg[4 * i])
             for i in range(n)]
    return crops, regions


def crops_to_canvas(crops: List[Tensor], regions: Tensor, image_size: Tuple[int, int], fill: float = 0.0,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """Assembles ``paste_masks_crops`` output into Tensor[N, H, W] canvases, ``fill`` outside the regions.

    ``fill`` is 0 (False) by default, which is what ``paste_masks`` has there except with a
    ``threshold <= 0`` (then ``0 >= threshold`` holds and its background is True: pass
    ``fill=True`` to get its canvases). ``dtype``: the crops' dtype by default; for N = 0 (no
    crops to take it from) float32 unless given (``torch.bool`` for thresholded crops).
    """
    h, w = int(image_size[0]), int(image_size[1])
    if dtype is None:
        dtype = crops[0].dtype if len(crops) > 0 else torch.float32
    out = torch.full((len(crops), h, w), fill, dtype=dtype, device=regions.device)
    reg: List[List[int]] = regions.tolist()
    for n, r in enumerate(reg):
        out[n, r[1]:r[3], r[0]:r[2]] = crops[n]
    return out


torch.fx.wrap("paste_masks")
torch.fx.wrap("paste_masks_crops")


def _squeeze_channel(masks: Tensor) -> Tensor:
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"paste_masks: masks must be Tensor[N, M, M] or [N, 1, M, M], got {masks.shape}")
        masks = masks[:, 0]
    return masks


@torch.library.register_fake("instseg::paste_masks_crops")
def _paste_masks_crops_fake(masks, boxes, image_height, image_width, padding, threshold, aligned):
    torch._check(masks.dim() == 3, lambda: "paste_masks: masks must be a Tensor[N, M, M]")
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "paste_masks: boxes must be a Tensor[N, 4]")
    torch._check(masks.shape[0] == boxes.shape[0], lambda: "paste_masks: one box per mask")
    torch._check(masks.shape[1] == masks.shape[2], lambda: "paste_masks: masks must be square")
    dtype = torch.bool if threshold is not None else masks.dtype
    total = torch.library.get_ctx().new_dynamic_size()
    n = masks.shape[0]
    return (masks.new_empty((total,), dtype=dtype), masks.new_empty((n, 4), dtype=torch.long),
            masks.new_empty((n + 1,), dtype=torch.long))


@torch.library.register_fake("instseg::paste_masks")
def _paste_masks_fake(masks, boxes, image_height, image_width, padding, threshold, aligned):
    torch._check(masks.dim() == 3, lambda: "paste_masks: masks must be a Tensor[N, M, M]")
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "paste_masks: boxes must be a Tensor[N, 4]")
    torch._check(masks.shape[0] == boxes.shape[0], lambda: "paste_masks: one box per mask")
    dtype = torch.bool if threshold is not None else masks.dtype
    return masks.new_empty((masks.shape[0], image_height, image_width), dtype=dtype)


# Gradients with respect to the masks (boxes get none, as in torchvision: its paste goes
# through integer boxes). Pasting is linear in the mask and separable: the region of mask n
# is Wy @ P @ Wx^T, with P the (padded) mask and Wy, Wx its bilinear weights along y and x,
# so the mask's gradient is Wy^T @ G @ Wx for the region's incoming gradient G. The weights
# follow the kernels' float32 geometry (csrc/paste_masks_common.h) step by step.
def _to_int(v: float) -> int:
    return int(max(-4.0e15, min(4.0e15, v)))


def _weights(src: Tensor, size: int, offset: int, valid: Optional[Tensor] = None) -> Tensor:
    """Dense [len(src), size] bilinear weights of the taps floor(src) and floor(src) + 1,
    columns shifted by ``offset``; taps outside [0, size) are dropped (zero padding)."""
    f = torch.floor(src)
    l1 = src - f
    i0 = f.long() + offset
    rows = torch.arange(src.shape[0], device=src.device)
    w = torch.zeros(src.shape[0], size + 2, dtype=torch.float32, device=src.device)
    keep = torch.ones_like(l1) if valid is None else valid.float()
    w.index_put_((rows, (i0 + 1).clamp(0, size + 1)), (1 - l1) * keep, accumulate=True)
    w.index_put_((rows, (i0 + 2).clamp(0, size + 1)), l1 * keep, accumulate=True)
    return w[:, 1:size + 1]


def _tv_axis(lo: np.float32, hi: np.float32, M: int, pad: int, n_pix: int, device):
    """torchvision mode along one axis: (clipped pixel range, weights into the M mask cells)."""
    P = M + 2 * pad
    scale = np.float32(P / M)
    half = np.float32(np.float32(np.float32(hi - lo) * np.float32(0.5)) * scale)
    centre = np.float32(np.float32(hi + lo) * np.float32(0.5))
    e0, e1 = np.float32(centre - half), np.float32(centre + half)
    if not (np.isfinite(e0) and np.isfinite(e1)):
        return None
    b0, b1 = _to_int(float(e0)), _to_int(float(e1))
    size = max(b1 - b0 + 1, 1)
    s = np.float32(np.float32(P) / np.float32(size))
    p0, p1 = min(max(b0, 0), n_pix), min(max(b1 + 1, 0), n_pix)
    if p0 >= p1:
        return None
    dst = torch.arange(p0 - b0, p1 - b0, device=device, dtype=torch.float32)
    src = (torch.tensor(float(s), device=device) * (dst + 0.5) - 0.5).clamp(min=0)
    i0 = torch.floor(src).clamp(max=P - 1)
    # Tap i0 + 1 exists unless i0 is the last padded cell (then both taps are that cell).
    src = torch.where(i0 >= P - 1, i0, src)
    return p0, p1, _weights(src, M, -pad)


def _aligned_axis(lo: np.float32, hi: np.float32, M: int, n_pix: int, device):
    """aligned mode along one axis: (pixel range, weights into the M mask cells)."""
    if not (hi > lo):
        return None
    cell = (float(hi) - float(lo)) / M
    p0 = min(max(_to_int(math.floor(float(lo) - cell)) - 1, 0), n_pix)
    p1 = min(max(_to_int(math.ceil(float(hi) + cell)) + 1, 0), n_pix)
    if p0 >= p1:
        return None
    centre = torch.arange(p0, p1, device=device, dtype=torch.float32) + 0.5
    lo_t = torch.tensor(float(lo), device=device)
    g = (centre - lo_t) / (torch.tensor(float(hi), device=device) - lo_t) * 2 - 1
    coord = ((g + 1) * M - 1) / 2
    f = torch.floor(coord)
    valid = (f >= -1) & (f <= M)
    return p0, p1, _weights(torch.where(valid, coord, torch.zeros_like(coord)), M, 0, valid)


def _paste_regions_backward(masks: Tensor, boxes: Tensor, height: int, width: int, padding: int, aligned: bool,
                            region_grad) -> Tensor:
    """Gradient of the masks; ``region_grad(n, x0, y0, x1, y1)`` gives mask n's incoming
    gradient over those pixels."""
    M = masks.shape[1]
    acc = torch.float64 if masks.dtype == torch.float64 else torch.float32
    grad = torch.zeros(masks.shape, dtype=acc, device=masks.device)
    for k, box in enumerate(boxes.detach().float().cpu().numpy()):
        x0, y0, x1, y1 = (np.float32(v) for v in box)
        if not np.isfinite(box).all():
            continue
        if aligned:
            ax, ay = _aligned_axis(x0, x1, M, width, masks.device), _aligned_axis(y0, y1, M, height, masks.device)
        else:
            ax, ay = (_tv_axis(x0, x1, M, padding, width, masks.device),
                      _tv_axis(y0, y1, M, padding, height, masks.device))
        if ax is None or ay is None:
            continue
        (px0, px1, wx), (py0, py1, wy) = ax, ay
        g = region_grad(k, px0, py0, px1, py1).to(acc)
        grad[k] = wy.to(acc).T @ g @ wx.to(acc)
    return grad.to(masks.dtype)


# The backward passes are ops of their own (Python implementations), so that torch.compile
# and torch.export see one opaque call instead of tracing their per-mask loop.
@torch.library.custom_op("instseg::_paste_masks_backward", mutates_args=())
def _paste_masks_backward_op(grad: Tensor, masks: Tensor, boxes: Tensor, height: int, width: int, padding: int,
                             aligned: bool) -> Tensor:
    return _paste_regions_backward(masks, boxes, height, width, padding, aligned,
                                   lambda n, x0, y0, x1, y1: grad[n, y0:y1, x0:x1])


@torch.library.custom_op("instseg::_paste_masks_crops_backward", mutates_args=())
def _paste_masks_crops_backward_op(grad: Tensor, masks: Tensor, boxes: Tensor, regions: Tensor, offsets: Tensor,
                                   height: int, width: int, padding: int, aligned: bool) -> Tensor:
    reg = regions.tolist()
    starts = offsets.tolist()

    def region_grad(n, x0, y0, x1, y1):
        if tuple(reg[n]) != (x0, y0, x1, y1):
            raise RuntimeError(f"paste_masks_crops backward: region {reg[n]} of mask {n} differs from the "
                               f"geometry's {(x0, y0, x1, y1)}")
        return grad[starts[n]:starts[n + 1]].view(y1 - y0, x1 - x0)

    return _paste_regions_backward(masks, boxes, height, width, padding, aligned, region_grad)


@_paste_masks_backward_op.register_fake
def _(grad, masks, boxes, height, width, padding, aligned):
    return torch.empty_like(masks, memory_format=torch.contiguous_format)


@_paste_masks_crops_backward_op.register_fake
def _(grad, masks, boxes, regions, offsets, height, width, padding, aligned):
    return torch.empty_like(masks, memory_format=torch.contiguous_format)


def _paste_setup(ctx, inputs, output):
    masks, boxes, height, width, padding, threshold, aligned = inputs
    ctx.save_for_backward(masks, boxes)
    ctx.args = (height, width, padding, aligned)


def _paste_backward(ctx, grad):
    masks, boxes = ctx.saved_tensors
    g = torch.ops.instseg._paste_masks_backward(grad, masks, boxes, *ctx.args)
    return g, None, None, None, None, None, None


def _crops_setup(ctx, inputs, output):
    masks, boxes, height, width, padding, threshold, aligned = inputs
    ctx.save_for_backward(masks, boxes, output[1], output[2])
    ctx.args = (height, width, padding, aligned)


def _crops_backward(ctx, grad, _grad_regions, _grad_offsets):
    masks, boxes, regions, offsets = ctx.saved_tensors
    g = torch.ops.instseg._paste_masks_crops_backward(grad, masks, boxes, regions, offsets, *ctx.args)
    return g, None, None, None, None, None, None


torch.library.register_autograd("instseg::paste_masks", _paste_backward, setup_context=_paste_setup)
torch.library.register_autograd("instseg::paste_masks_crops", _crops_backward, setup_context=_crops_setup)

# The functions themselves, for FX nodes (torch.fx.wrap patches this module's globals while
# tracing, and a node whose target were that patch could not be scripted).
_ORIGINAL = {"paste_masks": paste_masks, "paste_masks_crops": paste_masks_crops}
