"""Binary-mask ops: ``masks_to_boxes``, ``masks_to_rle``, ``stability_score`` and
``connected_components`` (used by the SAM automatic mask generator)."""
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor


def _check_masks(masks: Tensor, name: str) -> Tensor:
    if not isinstance(masks, Tensor):
        raise TypeError(f"{name}: masks must be a tensor, got {type(masks).__name__}")
    if masks.dim() != 3:
        raise ValueError(f"{name}: masks must be a (N, H, W) tensor, got shape {tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        if masks.is_floating_point() or masks.is_complex():
            raise TypeError(f"{name}: masks must be bool or integer (0/1), got {masks.dtype}; "
                            "threshold logits first")
        masks = masks != 0
    return masks


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(..., H, W) binary masks -> (..., 4) int64 XYXY boxes with inclusive maxima (the
    tightest box's last row and column, as torchvision's ``masks_to_boxes`` and SAM's
    ``batched_mask_to_box``); ``[0, 0, 0, 0]`` for an empty mask."""
    if masks.dim() < 2:
        raise ValueError(f"masks_to_boxes: masks must be (..., H, W), got shape {tuple(masks.shape)}")
    lead = masks.shape[:-2]
    h, w = masks.shape[-2:]
    m = masks.reshape(-1, h, w)
    m = m if m.dtype == torch.bool else m != 0
    if m.numel() == 0:
        return torch.zeros(*lead, 4, dtype=torch.long, device=masks.device)
    rows = m.any(dim=2)
    cols = m.any(dim=1)
    ar_h = torch.arange(h, device=m.device)
    ar_w = torch.arange(w, device=m.device)
    y1 = torch.where(rows, ar_h, h).amin(1)
    y2 = torch.where(rows, ar_h, -1).amax(1)
    x1 = torch.where(cols, ar_w, w).amin(1)
    x2 = torch.where(cols, ar_w, -1).amax(1)
    boxes = torch.stack([x1, y1, x2, y2], dim=1)
    empty = ~rows.any(1)
    boxes = boxes.masked_fill(empty[:, None], 0)
    return boxes.reshape(*lead, 4)


def masks_to_rle(masks: Tensor) -> List[Dict[str, Any]]:
    """(N, H, W) binary masks -> uncompressed COCO RLEs ``{"size": [H, W], "counts": [...]}``:
    run lengths in column-major (Fortran) order, starting with the run of zeros (0 when the
    first pixel is set); ``pycocotools.mask.frPyObjects`` reads them."""
    masks = _check_masks(masks, "masks_to_rle")
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.transpose(1, 2).reshape(n, h * w)
    if h * w == 0:
        return [{"size": [h, w], "counts": []} for _ in range(n)]
    change = flat[:, 1:] != flat[:, :-1]
    rows, cols = change.nonzero(as_tuple=True)
    per = torch.bincount(rows, minlength=n).cpu().numpy()
    pos = (cols + 1).cpu().numpy()
    first = flat[:, 0].cpu().numpy()
    out = []
    start = 0
    for i in range(n):
        p = pos[start:start + per[i]]
        start += per[i]
        runs = np.diff(np.concatenate([[0], p, [h * w]]))
        counts = ([0] if first[i] else []) + runs.tolist()
        out.append({"size": [h, w], "counts": counts})
    return out


def stability_score(logits: Tensor, threshold: float = 0.0, offset: float = 1.0) -> Tensor:
    """SAM's stability score of (..., H, W) mask logits: the number of pixels above
    ``threshold + offset`` over the number above ``threshold - offset`` (float32; NaN for a
    mask with no pixel above the lower threshold, as the official)."""
    if logits.dim() < 2:
        raise ValueError(f"stability_score: logits must be (..., H, W), got shape {tuple(logits.shape)}")
    inter = (logits > (threshold + offset)).sum((-1, -2), dtype=torch.int32)
    union = (logits > (threshold - offset)).sum((-1, -2), dtype=torch.int32)
    return inter / union


def connected_components(masks: Tensor, connectivity: int = 8) -> Tuple[Tensor, Tensor]:
    """Connected components of each (H, W) binary mask of a (N, H, W) batch (bool or integer,
    nonzero = foreground; any H and W, empty batches included), on the masks' device
    (``instseg::connected_components``: CPU and CUDA kernels).

    Returns ``labels`` (N, H, W) int32, 0 for background and 1..K_n for the components of
    mask n numbered in raster order of their first pixel (as ``scipy.ndimage.label``), and
    ``areas`` (N, K) int64 with ``areas[n, k - 1]`` the pixel count of component k of mask n,
    K the largest K_n, zero-padded. ``connectivity``: 8 (diagonal neighbours connect, as
    OpenCV's default and SAM's small-region cleanup) or 4."""
    if not isinstance(masks, Tensor):
        raise TypeError(f"connected_components: masks must be a tensor, got {type(masks).__name__}")
    return torch.ops.instseg.connected_components(masks, int(connectivity))


@torch.library.register_fake("instseg::connected_components")
def _connected_components_fake(masks, connectivity=8):
    torch._check(masks.dim() == 3, lambda: "connected_components: masks must be a Tensor[N, H, W]")
    k = torch.library.get_ctx().new_dynamic_size()
    return (masks.new_empty(masks.shape, dtype=torch.int32),
            masks.new_empty((masks.shape[0], k), dtype=torch.int64))
