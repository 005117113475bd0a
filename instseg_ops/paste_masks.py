"""Pasting per-RoI masks into image canvases, or into crops of them (CPU and CUDA kernels)."""
from typing import List, Optional, Tuple

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
# through integer boxes): the ops instseg::_paste_masks_backward and
# _paste_masks_crops_backward, C++/CUDA kernels on the forward's geometry
# (csrc/paste_masks_common.h). Pasting is linear in the masks, so the backward is linear in
# the incoming gradient and its own gradient (double backward) is the paste itself.
@torch.library.register_fake("instseg::_paste_masks_backward")
def _paste_masks_backward_fake(grad, masks, boxes, image_height, image_width, padding, aligned):
    torch._check(grad.dim() == 3, lambda: "paste_masks backward: the gradient must be a Tensor[N, H, W]")
    return masks.new_empty(masks.shape)


@torch.library.register_fake("instseg::_paste_masks_crops_backward")
def _paste_masks_crops_backward_fake(grad, masks, boxes, regions, offsets, image_height, image_width, padding,
                                     aligned):
    torch._check(grad.dim() == 1, lambda: "paste_masks_crops backward: the gradient must be 1-D")
    return masks.new_empty(masks.shape)


def _backward_setup(ctx, inputs, output):
    # inputs: grad, masks, boxes[, regions, offsets], image_height, image_width, padding, aligned
    ctx.save_for_backward(inputs[2])
    ctx.args = tuple(inputs[-4:])
    ctx.dtype = inputs[1].dtype


def _paste_backward_backward(ctx, grad_grad):
    (boxes,) = ctx.saved_tensors
    height, width, padding, aligned = ctx.args
    gg = torch.ops.instseg.paste_masks(grad_grad.to(ctx.dtype), boxes, height, width, padding, None, aligned)
    return gg, None, None, None, None, None, None


def _crops_backward_backward(ctx, grad_grad):
    (boxes,) = ctx.saved_tensors
    height, width, padding, aligned = ctx.args
    gg = torch.ops.instseg.paste_masks_crops(grad_grad.to(ctx.dtype), boxes, height, width, padding, None,
                                             aligned)[0]
    return gg, None, None, None, None, None, None, None, None


torch.library.register_autograd("instseg::_paste_masks_backward", _paste_backward_backward,
                                setup_context=_backward_setup)
torch.library.register_autograd("instseg::_paste_masks_crops_backward", _crops_backward_backward,
                                setup_context=_backward_setup)


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
