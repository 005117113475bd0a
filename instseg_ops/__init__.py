"""instseg_ops: C++/CUDA operators for instance segmentation, drop-in for torchvision.ops.

Ops are registered in the ``instseg`` namespace (``torch.ops.instseg.*``) when the
compiled extension ``instseg_ops._C`` is imported; this module adds the Python
wrappers, fake kernels (torch.compile / torch.export) and autograd formulas.
"""
import torch  # noqa: F401  (must be imported before the extension)

from . import _C  # noqa: F401  registers torch.ops.instseg.*
from .masks import (connected_components, masks_to_boxes, masks_to_boxes_torchvision, masks_to_rle, stability_score,
                    stability_score_and_boxes)
from .ms_deform_attn import MSDeformAttn, ms_deform_attn
from .multilevel import MultiScaleRoIAlign, assign_levels, multilevel_roi_align
from .nms import batched_nms, nms, soft_nms
from .paste_masks import crops_to_canvas, paste_masks, paste_masks_crops
from .roi_align import RoIAlign, roi_align

__version__ = "0.1.0"


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("instseg::roi_align", "CUDA")


__all__ = [
    "roi_align", "RoIAlign", "multilevel_roi_align", "assign_levels", "MultiScaleRoIAlign", "nms", "batched_nms",
    "soft_nms", "paste_masks",
    "paste_masks_crops", "crops_to_canvas", "ms_deform_attn", "MSDeformAttn",
    "masks_to_boxes", "masks_to_boxes_torchvision", "masks_to_rle", "stability_score", "stability_score_and_boxes",
    "connected_components",
    "cuda_built",
    "__version__",
]
