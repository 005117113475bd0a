"""Cascade Mask R-CNN: ``model`` (``CascadeRoIHeads``, ``CascadeMaskRCNN``, the builders, the
training preset) and ``stage_iou`` (the mechanism measured on a trained model:
``python -m instseg_ops.models.cascade_rcnn --stage-iou CHECKPOINT --data DIR``)."""
from .model import (
    STAGE_BBOX_REG_WEIGHTS,
    STAGE_IOUS,
    VARIANTS,
    CascadeMaskRCNN,
    CascadeRoIHeads,
    GradientScaledPooler,
    cascade_maskrcnn_resnet50_fpn,
    cascade_maskrcnn_resnet_fpn,
    scale_gradient,
)
from .stage_iou import stage_input_ious

__all__ = ["CascadeMaskRCNN", "CascadeRoIHeads", "GradientScaledPooler", "STAGE_BBOX_REG_WEIGHTS", "STAGE_IOUS",
           "VARIANTS", "cascade_maskrcnn_resnet50_fpn", "cascade_maskrcnn_resnet_fpn", "scale_gradient",
           "stage_input_ious"]
