"""Instance segmentation models built on instseg_ops (installed as instseg_ops.models).

Mask R-CNN is assembled from reusable pieces, each in its own module: ``backbone`` (ResNet
bodies of depth 18/34/50/101 with frozen BN, BN or GroupNorm; FPN with the extra "pool"
level), ``anchors``, ``boxes`` (IoU, box coder), ``matcher`` (IoU matcher, balanced
positive/negative sampler), ``rpn`` (head, proposal filtering, losses), ``roi_heads`` (box and
mask heads, their targets and losses, detection postprocessing) and ``transform`` (resize,
normalise, batch; boxes back to the input sizes and masks pasted). RoIAlign, level
assignment, NMS and mask pasting are instseg_ops' ops.
"""
from .anchors import AnchorGenerator
from .backbone import BackboneWithFPN, FeaturePyramid, FrozenBatchNorm2d, GroupNorm32, ResNetBody, resnet_fpn_backbone
from .boxes import BoxCoder, box_iou
from .mask_rcnn import MaskRCNN, load_torchvision_weights, maskrcnn_resnet50_fpn, maskrcnn_resnet_fpn
from .matcher import BalancedSampler, Matcher
from .roi_heads import BoxPredictor, MaskHead, MaskPredictor, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead
from .transform import DetectionTransform

__all__ = ["MaskRCNN", "maskrcnn_resnet50_fpn", "maskrcnn_resnet_fpn", "load_torchvision_weights",
           "AnchorGenerator", "BackboneWithFPN", "FeaturePyramid", "FrozenBatchNorm2d", "GroupNorm32", "ResNetBody",
           "resnet_fpn_backbone", "BoxCoder", "box_iou", "Matcher", "BalancedSampler", "RegionProposalNetwork",
           "RPNHead", "RoIHeads", "TwoMLPHead", "BoxPredictor", "MaskHead", "MaskPredictor", "DetectionTransform"]
