"""Pasting per-RoI masks into image canvases, or into crops of them (CPU and CUDA kernels)."""
from typing import List, Optional, Tuple

import torch
from torch import Tensor


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
    """
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
    """
    masks = _squeeze_channel(masks)
    h, w = int(image_size[0]), int(image_size[1])
    data, regions, offsets = torch.ops.instseg.paste_masks_crops(
        masks, boxes, h, w, int(padding), None if threshold is None else float(threshold), bool(aligned))
    n = regions.shape[0]
    host = torch.cat([regions.flatten(), offsets]).tolist()  # one device-to-host copy
    reg, starts = host[:4 * n], host[4 * n:]
    crops = [data[starts[i]:starts[i + 1]].view(reg[4 * i + 3] - reg[4 * i + 1], reg[4 * i + 2] - reg[4 * i])
             for i in range(n)]
    return crops, regions


def crops_to_canvas(crops: List[Tensor], regions: Tensor, image_size: Tuple[int, int], fill: float = 0,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """Assembles ``paste_masks_crops`` output into Tensor[N, H, W] canvases, ``fill`` outside the regions.

    ``fill`` is 0 (False) by default, which is what ``paste_masks`` has there except with a
    ``threshold <= 0`` (then ``0 >= threshold`` holds and its background is True: pass
    ``fill=True`` to get its canvases). ``dtype``: the crops' dtype by default; for N = 0 (no
    crops to take it from) float32 unless given (``torch.bool`` for thresholded crops).
    """
    h, w = int(image_size[0]), int(image_size[1])
    if dtype is None:
        dtype = crops[0].dtype if crops else torch.float32
    out = torch.full((len(crops), h, w), fill, dtype=dtype, device=regions.device)
    for n, (x0, y0, x1, y1) in enumerate(regions.tolist()):
        out[n, y0:y1, x0:x1] = crops[n]
    return out


def _squeeze_channel(masks: Tensor) -> Tensor:
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"paste_masks: masks must be Tensor[N, M, M] or [N, 1, M, M], got {tuple(masks.shape)}")
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


# No gradients: the pasted canvases are for inference and evaluation (Mask R-CNN's mask loss is
# on the M x M masks). Without a registration, outputs of inputs that require grad would
# silently backpropagate nothing; with this one, a backward through them raises instead.
def _not_differentiable(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"instseg::{op} is not differentiable (no backward is implemented); "
                           "compute losses on the M x M masks, or paste with torchvision's "
                           "differentiable paste_masks_in_image")
    return backward


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd("instseg::paste_masks", _not_differentiable("paste_masks"),
                                setup_context=_no_context)
torch.library.register_autograd("instseg::paste_masks_crops", _not_differentiable("paste_masks_crops"),
                                setup_context=_no_context)
