"""Instance segmentation models built on instseg_ops (installed as ``instseg_ops.models``).

Layout:

- ``backbones/``: ResNet bodies, the FPN with pluggable top blocks, normalisation layers;
- ``detection/``: anchors, box ops, matcher and sampler, RPN, RoI geometry and poolers, the
  box and mask stages, the image transform;
- one module or subpackage per model family (``mask_rcnn``, ``cascade_rcnn``, ``centermask``, ``mask2former``, ``sam``);
- ``registry`` (``get_model``, ``list_models``) and ``weights`` (``load_pretrained``);
- ``data/``: COCO-format datasets, the synthetic shapes generator, COCO evaluation;
- ``engine/``: the trainer, its hooks, checkpoints, distributed helpers, presets;
- command lines: ``python -m instseg_ops.models.train``, ``.evaluate``, ``.demo``.

RoIAlign, level assignment, NMS and mask pasting are instseg_ops' ops.
"""
from .backbones import (
                        BackboneWithFPN,
                        FeaturePyramid,
                        FrozenBatchNorm2d,
                        GroupNorm32,
                        LastLevelMaxPool,
                        LastLevelP6P7,
                        ResNetBody,
                        VoVNetBody,
                        resnet_fpn_backbone,
                        vovnet,
)
from .detection import (
                        AnchorGenerator,
                        BalancedSampler,
                        BoxCoder,
                        BoxPredictor,
                        BoxStage,
                        DetectionTransform,
                        MaskHead,
                        MaskPredictor,
                        Matcher,
                        RegionProposalNetwork,
                        RoIGeometry,
                        RoIHeads,
                        RPNHead,
                        TwoMLPHead,
                        box_iou,
)
from .cascade_rcnn import CascadeMaskRCNN, CascadeRoIHeads, cascade_maskrcnn_resnet50_fpn, cascade_maskrcnn_resnet_fpn
from .mask2former import (Mask2Former, MaskFormer, mask2former_resnet, mask2former_resnet50, mask2former_resnet101,
                          maskformer_resnet, maskformer_resnet50)
from .centermask import (
                         CenterMask,
                         centermask_lite_shapes,
                         centermask_lite_v19,
                         centermask_lite_v19_slim_dw,
                         centermask_lite_v39,
                         centermask_v39,
                         centermask_v57,
                         centermask_v99,
                         centermask_vovnet,
)
from .mask_rcnn import MaskRCNN, maskrcnn_resnet50_fpn, maskrcnn_resnet_fpn
from .registry import get_model, list_models, register_model
from .sam import Sam, SamAutomaticMaskGenerator, SamPredictor, sam_model_registry
from .weights import load_pretrained, load_torchvision_weights, register_layout

__all__ = ["get_model", "list_models", "register_model", "load_pretrained", "register_layout",
           "load_torchvision_weights", "MaskRCNN", "CascadeMaskRCNN", "CascadeRoIHeads",
           "cascade_maskrcnn_resnet50_fpn", "cascade_maskrcnn_resnet_fpn", "maskrcnn_resnet50_fpn", "maskrcnn_resnet_fpn",
           "AnchorGenerator", "BackboneWithFPN", "FeaturePyramid", "LastLevelMaxPool", "LastLevelP6P7",
           "FrozenBatchNorm2d", "GroupNorm32", "ResNetBody", "resnet_fpn_backbone", "BoxCoder", "box_iou", "Matcher",
           "BalancedSampler", "RegionProposalNetwork", "RPNHead", "RoIGeometry", "RoIHeads", "BoxStage",
           "TwoMLPHead", "BoxPredictor", "MaskHead", "MaskPredictor", "DetectionTransform", "Mask2Former",
           "mask2former_resnet", "mask2former_resnet50", "mask2former_resnet101", "MaskFormer",
           "maskformer_resnet", "maskformer_resnet50", "vovnet", "VoVNetBody",
           "CenterMask", "centermask_vovnet", "centermask_v39", "centermask_v57", "centermask_v99",
           "centermask_lite_v19", "centermask_lite_v39", "centermask_lite_v19_slim_dw", "centermask_lite_shapes",
           "Sam", "SamPredictor", "SamAutomaticMaskGenerator", "sam_model_registry"]
