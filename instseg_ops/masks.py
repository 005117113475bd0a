"""Binary-mask ops: ``masks_to_boxes``, ``masks_to_rle``, ``stability_score`` and
``connected_components`` (used by the SAM automatic mask generator)."""
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F
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
    """Connected components of each (H, W) binary mask of a (N, H, W) batch.

    Returns ``labels`` (N, H, W) int32, 0 for background and 1..K_n for the components of
    mask n numbered in raster order of their first pixel (as ``scipy.ndimage.label``), and
    ``areas`` (N, K) int64 with ``areas[n, k - 1]`` the pixel count of component k of mask n,
    K the largest K_n, zero-padded. ``connectivity``: 4 or 8."""
    masks = _check_masks(masks, "connected_components")
    if connectivity not in (4, 8):
        raise ValueError(f"connected_components: connectivity must be 4 or 8, got {connectivity}")
    n, h, w = masks.shape
    dev = masks.device
    if n * h * w == 0:
        return (torch.zeros((n, h, w), dtype=torch.int32, device=dev),
                torch.zeros((n, 0), dtype=torch.long, device=dev))
    big = float(h * w + 1)
    idx = torch.arange(1, h * w + 1, dtype=torch.float64, device=dev).reshape(1, 1, h, w)
    m = masks[:, None]
    lab = torch.where(m, idx, big)
    while True:
        if connectivity == 8:
            nb = -F.max_pool2d(-lab, 3, 1, 1)
        else:
            p = F.pad(lab, (1, 1, 1, 1), value=big)
            nb = torch.minimum(torch.minimum(p[..., 1:-1, :-2], p[..., 1:-1, 2:]),
                               torch.minimum(p[..., :-2, 1:-1], p[..., 2:, 1:-1]))
            nb = torch.minimum(nb, lab)
        new = torch.where(m, nb, big)
        if torch.equal(new, lab):
            break
        lab = new
    lab = lab[:, 0]
    labels = torch.zeros((n, h, w), dtype=torch.int32, device=dev)
    counts = []
    for i in range(n):
        li = lab[i]
        fg = masks[i]
        roots, inv = torch.unique(li[fg], return_inverse=True)   # sorted: raster order of first pixels
        labels[i][fg] = (inv + 1).to(torch.int32)
        counts.append(torch.bincount(inv, minlength=roots.numel()))
    k = max(c.numel() for c in counts)
    areas = torch.zeros((n, k), dtype=torch.long, device=dev)
    for i, c in enumerate(counts):
        areas[i, :c.numel()] = c
    return labels, areas
