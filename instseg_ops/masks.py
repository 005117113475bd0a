"""Binary-mask ops: ``masks_to_boxes``, ``masks_to_rle``, ``stability_score``,
``stability_score_and_boxes`` and ``connected_components`` (used by the SAM automatic mask
generator), each a registered op (``torch.ops.instseg.*``) with CPU and CUDA kernels."""
import math
from typing import Any, Dict, List, Tuple

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


def _flatten_leading(x: Tensor, name: str, what: str) -> Tuple[Tensor, Tuple[int, ...]]:
    """(..., H, W) -> ((N, H, W) view or copy, the leading shape), with clear errors."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name}: {what} must be a tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{name}: {what} must be (..., H, W), got shape {tuple(x.shape)}")
    lead = tuple(x.shape[:-2])
    return x.reshape(math.prod(lead), *x.shape[-2:]), lead


def masks_to_boxes(masks: Tensor) -> Tensor:
    """(..., H, W) binary masks (bool, integer or floating point, nonzero = foreground) ->
    (..., 4) int64 XYXY boxes with inclusive maxima (the tightest box's first and last column
    and row), ``[0, 0, 0, 0]`` for an empty mask: segment_anything's ``batched_mask_to_box``
    (``instseg::masks_to_boxes``: CPU and CUDA kernels, one pass over each mask). For
    torchvision's ``masks_to_boxes`` (float32 boxes, same values) see
    :func:`masks_to_boxes_torchvision`."""
    m, lead = _flatten_leading(masks, "masks_to_boxes", "masks")
    if m.is_floating_point() or m.is_complex():
        m = m != 0
    return torch.ops.instseg.masks_to_boxes(m).reshape(*lead, 4)


def masks_to_boxes_torchvision(masks: Tensor) -> Tensor:
    """``torchvision.ops.masks_to_boxes``'s convention: (N, H, W) masks -> float32 (N, 4) XYXY
    boxes with inclusive maxima, zeros for an empty mask, and a (0, 4) result whenever the
    masks have no element (also for N > 0 masks of zero area, as torchvision). The same
    kernel as :func:`masks_to_boxes`."""
    if not isinstance(masks, Tensor) or masks.dim() != 3:
        raise ValueError("masks_to_boxes_torchvision: masks must be a (N, H, W) tensor, got "
                         f"{tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__}")
    if masks.numel() == 0:
        return torch.zeros((0, 4), device=masks.device, dtype=torch.float)
    return masks_to_boxes(masks).float()


def rle_from_counts(counts: Tensor, offsets: Tensor, h: int, w: int) -> List[Dict[str, Any]]:
    """The dicts ``{"size": [h, w], "counts": [...]}`` of ``instseg::masks_to_rle``'s flat
    ``counts`` and per-mask ``offsets`` (one device-to-host copy of each)."""
    c = counts.tolist()
    o = offsets.tolist()
    return [{"size": [h, w], "counts": c[o[i]:o[i + 1]]} for i in range(len(o) - 1)]


def masks_to_rle(masks: Tensor) -> List[Dict[str, Any]]:
    """(N, H, W) binary masks -> uncompressed COCO RLEs ``{"size": [H, W], "counts": [...]}``:
    run lengths in column-major (Fortran) order, starting with the run of zeros (0 when the
    first pixel is set); ``pycocotools.mask.frPyObjects`` reads them. The runs are measured
    on the masks' device (``instseg::masks_to_rle``: CPU and CUDA kernels, returning a flat
    counts tensor and per-mask offsets); only the final lists are built in Python."""
    masks = _check_masks(masks, "masks_to_rle")
    n, h, w = masks.shape
    counts, offsets = torch.ops.instseg.masks_to_rle(masks)
    return rle_from_counts(counts, offsets, h, w)


def stability_score_and_boxes(logits: Tensor, mask_threshold: float = 0.0,
                              threshold_offset: float = 1.0) -> Tuple[Tensor, Tensor]:
    """One pass over (..., H, W) mask logits: SAM's stability score (as :func:`stability_score`)
    and the boxes of the masks ``logits > mask_threshold`` (as :func:`masks_to_boxes`), without
    materialising the masks (``instseg::stability_score_and_boxes``: CPU and CUDA kernels).
    Returns float32 (...) scores and int64 (..., 4) boxes."""
    flat, lead = _flatten_leading(logits, "stability_score_and_boxes", "logits")
    scores, boxes = torch.ops.instseg.stability_score_and_boxes(flat, float(mask_threshold), float(threshold_offset))
    return scores.reshape(lead), boxes.reshape(*lead, 4)


def stability_score(logits: Tensor, threshold: float = 0.0, offset: float = 1.0) -> Tensor:
    """SAM's stability score of (..., H, W) mask logits: the number of pixels above
    ``threshold + offset`` over the number above ``threshold - offset`` (float32; NaN for a
    mask with no pixel above the lower threshold, as the official). Floating-point logits go
    through ``instseg::stability_score_and_boxes`` (one pass); other dtypes through torch."""
    if logits.dim() < 2:
        raise ValueError(f"stability_score: logits must be (..., H, W), got shape {tuple(logits.shape)}")
    if logits.is_floating_point():
        return stability_score_and_boxes(logits, threshold, offset)[0]
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


@torch.library.register_fake("instseg::masks_to_boxes")
def _masks_to_boxes_fake(masks):
    torch._check(masks.dim() == 3, lambda: "masks_to_boxes: masks must be a Tensor[N, H, W]")
    return masks.new_empty((masks.shape[0], 4), dtype=torch.int64)


@torch.library.register_fake("instseg::masks_to_rle")
def _masks_to_rle_fake(masks):
    torch._check(masks.dim() == 3, lambda: "masks_to_rle: masks must be a Tensor[N, H, W]")
    c = torch.library.get_ctx().new_dynamic_size()
    return masks.new_empty((c,), dtype=torch.int64), masks.new_empty((masks.shape[0] + 1,), dtype=torch.int64)


@torch.library.register_fake("instseg::stability_score_and_boxes")
def _stability_score_and_boxes_fake(logits, mask_threshold, offset):
    torch._check(logits.dim() == 3, lambda: "stability_score_and_boxes: logits must be a Tensor[N, H, W]")
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n, 4), dtype=torch.int64)
