"""RoI geometry and poolers of the second stage.

``RoIGeometry`` is the one object that holds the RoI sampling convention of a model: the
poolers, the mask targets and the mask paste all read it, so a model cannot pool features
with one convention and paste masks with another.
"""
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from torch import Tensor

import instseg_ops


@dataclass(frozen=True)
class RoIGeometry:
    """``aligned=False``: torchvision's geometry (for its weights): RoIAlign without the
    half-pixel shift, mask targets sampled the same way, integer-box pasting
    (``paste_masks(aligned=False)``), training masks resized with "nearest".
    ``aligned=True``: half-pixel-correct geometry, as detectron2's ROIAlignV2: RoIAlign with
    ``aligned=True`` for the features and the mask targets, sub-pixel pasting
    (``paste_masks(aligned=True)``) and "nearest-exact" mask resizing. With ``aligned=False``
    the mask head learns targets shifted by half a pixel, which the integer-box paste does
    not undo."""

    aligned: bool = False

    def pooler(self, featmap_names: Sequence[str], output_size: int, sampling_ratio: int, *,
               rule: str = "fpn", canonical_scale: float = 224.0) -> instseg_ops.MultiScaleRoIAlign:
        """A multi-level RoIAlign over ``featmap_names`` with this geometry; ``rule`` and
        ``canonical_scale`` choose each RoI's level (``instseg_ops.assign_levels``)."""
        return instseg_ops.MultiScaleRoIAlign(list(featmap_names), output_size, sampling_ratio, rule=rule,
                                              canonical_scale=canonical_scale, aligned=self.aligned)

    @property
    def mask_resize_mode(self) -> str:
        """Interpolation mode for resizing training masks with their image: "nearest-exact"
        (output pixel i takes the input pixel under its centre, as the bilinear image resize)
        when aligned, else torchvision's "nearest" (floor(i / scale), up to a pixel off)."""
        return "nearest-exact" if self.aligned else "nearest"

    def mask_targets(self, gt_masks: List[Tensor], proposals: List[Tensor], matched: List[Tensor],
                     size: int) -> Tensor:
        """Ground-truth masks cropped to the proposals and resampled to size x size (see
        ``mask_targets``)."""
        return mask_targets(gt_masks, proposals, matched, size, self.aligned)

    def paste(self, masks: Tensor, boxes: Tensor, image_size: Tuple[int, int]) -> Tensor:
        """Per-box mask probabilities [K, M, M] pasted into [K, H, W] canvases."""
        return instseg_ops.paste_masks(masks, boxes, image_size, padding=1, aligned=self.aligned)


def mask_targets(gt_masks: List[Tensor], proposals: List[Tensor], matched: List[Tensor], size: int,
                 aligned: bool = False) -> Tensor:
    """Ground-truth masks cropped to the proposals and resampled to size x size with
    instseg_ops.roi_align (the mask of proposal i is gt_masks[matched[i]]); ``aligned``: RoIAlign's
    half-pixel-correct sampling (cell j of a box x0..x1 samples x0 + (j + 0.5) (x1 - x0) / size in
    continuous coordinates, where pixel k's centre is k + 0.5)."""
    out = []
    for masks, boxes, idx in zip(gt_masks, proposals, matched):
        rois = torch.cat([idx.to(boxes)[:, None], boxes], dim=1)
        out.append(instseg_ops.roi_align(masks[:, None].to(rois), rois, (size, size), 1.0, aligned=aligned)[:, 0])
    return torch.cat(out) if out else proposals[0].new_zeros((0, size, size))
