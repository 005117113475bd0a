"""Instance segmentation models built on instseg_ops (installed as instseg_ops.models).

Mask R-CNN is assembled from reusable pieces: ``backbone`` (ResNet bodies, FPN),
``anchors``, ``boxes`` (IoU, box coder), ``matcher`` (matcher, balanced sampler), ``rpn``,
``roi_heads`` (box and mask heads, losses, postprocessing) and ``transform``.
"""
from .mask_rcnn import MaskRCNN, load_torchvision_weights, maskrcnn_resnet50_fpn, maskrcnn_resnet_fpn

__all__ = ["MaskRCNN", "maskrcnn_resnet50_fpn", "maskrcnn_resnet_fpn", "load_torchvision_weights"]
