"""Pasting per-RoI masks into image canvases (CPU kernel; CUDA kernel to come)."""
from typing import Optional, Tuple

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
    float canvas is allocated. Boxes with a non-finite coordinate paste nothing.
    """
    if masks.dim() == 4:
        if masks.shape[1] != 1:
            raise ValueError(f"paste_masks: masks must be Tensor[N, M, M] or [N, 1, M, M], got {tuple(masks.shape)}")
        masks = masks[:, 0]
    h, w = int(image_size[0]), int(image_size[1])
    return torch.ops.instseg.paste_masks(masks, boxes, h, w, int(padding),
                                         None if threshold is None else float(threshold), bool(aligned))


@torch.library.register_fake("instseg::paste_masks")
def _paste_masks_fake(masks, boxes, image_height, image_width, padding, threshold, aligned):
    torch._check(masks.dim() == 3, lambda: "paste_masks: masks must be a Tensor[N, M, M]")
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "paste_masks: boxes must be a Tensor[N, 4]")
    dtype = torch.bool if threshold is not None else masks.dtype
    return masks.new_empty((masks.shape[0], image_height, image_width), dtype=dtype)
