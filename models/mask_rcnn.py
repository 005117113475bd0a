"""Mask R-CNN (He et al., 2017): backbone with FPN, RPN, and the box and mask stages.

Builders: ``maskrcnn_resnet_fpn`` (any ResNet depth and normalisation), ``maskrcnn_resnet50_fpn``
(torchvision's architecture and defaults) and the models of the training presets for the
synthetic shapes data; all registered (``instseg_ops.models.get_model``).
"""
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor, nn

from .backbones import resnet_fpn_backbone
from .detection.anchors import AnchorGenerator
from .detection.poolers import RoIGeometry
from .detection.roi_heads import BoxPredictor, MaskHead, MaskPredictor, RoIHeads, TwoMLPHead
from .detection.rpn import RegionProposalNetwork, RPNHead
from .detection.transform import DetectionTransform
from .registry import register_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The synthetic shapes data set: 6 categories + background.
SHAPES_NUM_CLASSES = 7


class MaskRCNN(nn.Module):
    """``model(images, targets=None)``: images is a list of float Tensor[3, H, W] in [0, 1].
    Training (``model.train()``): targets is a list of dicts with ``boxes`` (float [K, 4],
    x1 y1 x2 y2 pixels), ``labels`` (int64 [K], 0 is background) and ``masks`` (uint8
    [K, H, W]); returns the loss dict (``loss_classifier``, ``loss_box_reg``, ``loss_mask``,
    ``loss_objectness``, ``loss_rpn_box_reg``). Evaluation: returns one dict per image with
    ``boxes``, ``labels``, ``scores`` and ``masks`` (float [K, 1, H, W] probabilities) in the
    input images' coordinates."""

    def __init__(self, *, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 transform: DetectionTransform):
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = transform, backbone, rpn, roi_heads

    def set_train_scale(self, scale: float) -> None:
        """Progressive resizing: training images are resized to ``scale`` times the model's
        size (evaluation always uses the full size)."""
        self.transform.train_scale = float(scale)

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        if self.training:
            if targets is None:
                raise ValueError("MaskRCNN: targets are required in training mode")
            for t in targets:
                b = t["boxes"]
                if b.dim() != 2 or b.shape[-1] != 4:
                    raise ValueError(f"target boxes must be a Tensor[K, 4], got shape {tuple(b.shape)}")
                if b.numel() and ((b[:, 2:] <= b[:, :2]).any()):
                    raise ValueError("target boxes must have positive width and height")
        original_sizes: List[Tuple[int, int]] = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        batch, sizes, targets = self.transform(images, targets)
        features = self.backbone(batch)
        proposals, rpn_losses = self.rpn(tuple(batch.shape[-2:]), sizes, features, targets)
        detections, head_losses = self.roi_heads(features, proposals, sizes, targets)
        if self.training:
            return {**head_losses, **rpn_losses}
        return self.transform.postprocess(detections, sizes, original_sizes)


@register_model()
def maskrcnn_resnet_fpn(depth: int = 50, num_classes: int = 91, norm: str = "frozen_bn", trainable_layers: int = 3,
                        width: int = 64, fpn_channels: int = 256, fpn_norm: Optional[str] = None,
                        head_norm: Optional[str] = None, min_size=800, max_size: int = 1333,
                        image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                        anchor_sizes=((32,), (64,), (128,), (256,), (512,)), aspect_ratios=(0.5, 1.0, 2.0),
                        rpn_pre_nms_top_n_train: int = 2000, rpn_pre_nms_top_n_test: int = 1000,
                        rpn_post_nms_top_n_train: int = 2000, rpn_post_nms_top_n_test: int = 1000,
                        rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7, rpn_bg_iou_thresh: float = 0.3,
                        rpn_batch_size_per_image: int = 256, rpn_positive_fraction: float = 0.5,
                        rpn_score_thresh: float = 0.0, box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5,
                        box_detections_per_img: int = 100, box_fg_iou_thresh: float = 0.5,
                        box_bg_iou_thresh: float = 0.5, box_batch_size_per_image: int = 512,
                        box_positive_fraction: float = 0.25, bbox_reg_weights=(10.0, 10.0, 5.0, 5.0),
                        representation_size: int = 1024, mask_layers=(256, 256, 256, 256),
                        mask_hidden: int = 256, channels_last: Optional[bool] = None,
                        roi_level_rule: str = "fpn", roi_canonical_scale: float = 224.0,
                        mask_positives_per_image: int = 0, aligned: bool = False) -> MaskRCNN:
    """Mask R-CNN on a ResNet-{18,34,50,101}-FPN. Defaults are torchvision's
    ``maskrcnn_resnet50_fpn`` (its keyword names work as overrides).

    - ``norm``: the backbone's normalisation ("frozen_bn" for pretrained weights, "bn" or "gn"
      to train from scratch); ``fpn_norm`` / ``head_norm``: optional normalisation in the FPN
      and the mask head; ``width``: channels of the first ResNet stage (64 is the standard).
    - ``channels_last``: memory format of the batched images (None: channels_last on the CPU,
      see ``DetectionTransform``).
    - ``roi_level_rule`` / ``roi_canonical_scale``: which FPN level each RoI is pooled from
      (``instseg_ops.assign_levels``: "fpn" puts a box of side ``roi_canonical_scale`` on P4,
      boxes twice as large one level up; 224 suits ~800 px images, smaller images want a
      proportionally smaller scale; "scale_adaptive" uses the box's share of the image area).
    - ``mask_positives_per_image``: train the mask head on at most this many of an image's
      positive RoIs, drawn at random (0: all of them, as torchvision).
    - ``aligned``: the RoI geometry (``RoIGeometry``): half-pixel-correct RoIAlign for the box
      and mask features and the mask targets, and sub-pixel mask pasting, as detectron2's
      ROIAlignV2; False is torchvision's geometry, for its weights.
    """
    geometry = RoIGeometry(aligned=aligned)
    backbone = resnet_fpn_backbone(depth, norm, trainable_layers, fpn_channels, width, fpn_norm)
    anchors = AnchorGenerator(anchor_sizes, (tuple(aspect_ratios),) * len(anchor_sizes))
    rpn = RegionProposalNetwork(
        anchor_generator=anchors, head=RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]),
        fg_iou_thresh=rpn_fg_iou_thresh, bg_iou_thresh=rpn_bg_iou_thresh, batch_size_per_image=rpn_batch_size_per_image,
        positive_fraction=rpn_positive_fraction,
        pre_nms_top_n={"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
        post_nms_top_n={"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test},
        nms_thresh=rpn_nms_thresh, score_thresh=rpn_score_thresh)
    # RoIs are pooled from the body's levels (P2-P5), not from the top block's.
    levels = list(backbone.body.out_features)
    level_kw = dict(rule=roi_level_rule, canonical_scale=roi_canonical_scale)
    heads = RoIHeads(
        box_roi_pool=geometry.pooler(levels, 7, 2, **level_kw),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=BoxPredictor(representation_size, num_classes),
        mask_roi_pool=geometry.pooler(levels, 14, 2, **level_kw),
        mask_head=MaskHead(fpn_channels, mask_layers, head_norm),
        mask_predictor=MaskPredictor(mask_layers[-1], mask_hidden, num_classes),
        fg_iou_thresh=box_fg_iou_thresh, bg_iou_thresh=box_bg_iou_thresh,
        batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
        bbox_reg_weights=bbox_reg_weights, score_thresh=box_score_thresh, nms_thresh=box_nms_thresh,
        detections_per_img=box_detections_per_img, mask_positives_per_image=mask_positives_per_image,
        geometry=geometry)
    transform = DetectionTransform(min_size, max_size, image_mean, image_std, channels_last=channels_last,
                                   geometry=geometry)
    return MaskRCNN(backbone=backbone, rpn=rpn, roi_heads=heads, transform=transform)


@register_model()
def maskrcnn_resnet50_fpn(num_classes: int = 91, **overrides) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` architecture and defaults; its state dict loads
    with ``strict=True`` (``load_pretrained``). Nothing is downloaded."""
    return maskrcnn_resnet_fpn(depth=50, num_classes=num_classes, **overrides)


# ---------------------------------------------------------------------------------------------
# models of the training presets (synthetic shapes data, trained from scratch)


def shapes_model_kwargs(depth: int, size: int, fpn_channels: int, representation_size: int, mask_channels: int,
                        num_mask_layers: int, anchor_base: int, **extra) -> Dict[str, Any]:
    """Keyword arguments of ``maskrcnn_resnet_fpn`` for training from scratch on small images:
    trainable GroupNorm everywhere (backbone, FPN, mask head), all backbone stages trainable,
    half-pixel-correct RoI geometry, anchors and RPN/RoI sample counts scaled down to a few
    small objects per image."""
    kw = dict(
        depth=depth, num_classes=SHAPES_NUM_CLASSES, norm="gn", fpn_norm="gn", head_norm="gn", trainable_layers=5,
        aligned=True,
        fpn_channels=fpn_channels, representation_size=representation_size,
        mask_layers=(mask_channels,) * num_mask_layers, mask_hidden=mask_channels,
        min_size=size, max_size=size,
        anchor_sizes=tuple((anchor_base * 2 ** i,) for i in range(5)),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128, box_detections_per_img=50,
    )
    kw.update(extra)
    return kw


SHAPES_MODELS: Dict[str, Dict[str, Any]] = {
    # ResNet-18-FPN (full width) on 256 px images.
    "maskrcnn_r18_shapes": shapes_model_kwargs(18, 256, fpn_channels=128, representation_size=512,
                                               mask_channels=128, num_mask_layers=2, anchor_base=16),
    # Half-width ResNet-18-FPN (stages of 32-256 channels) on 256 px images, about 4x fewer
    # backbone FLOPs; the mask loss uses at most 8 positive RoIs per image.
    "maskrcnn_r18_half_shapes": shapes_model_kwargs(18, 256, fpn_channels=64, representation_size=256,
                                                    mask_channels=64, num_mask_layers=2, anchor_base=16, width=32,
                                                    mask_positives_per_image=8),
    # ResNet-50-FPN on 512 px images (GPU).
    "maskrcnn_r50_shapes": shapes_model_kwargs(50, 512, fpn_channels=256, representation_size=1024,
                                               mask_channels=256, num_mask_layers=4, anchor_base=32,
                                               rpn_batch_size_per_image=256, box_batch_size_per_image=256,
                                               rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
                                               rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=500,
                                               box_detections_per_img=100),
    # A very small network on 64 px images: tests and smoke runs (seconds on a CPU).
    "maskrcnn_tiny_shapes": shapes_model_kwargs(18, 64, fpn_channels=16, representation_size=32, mask_channels=16,
                                                num_mask_layers=1, anchor_base=8, width=8,
                                                rpn_batch_size_per_image=64, box_batch_size_per_image=32,
                                                rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                                                rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50,
                                                box_detections_per_img=20),
}


def _register_shapes_model(name: str, kwargs: Dict[str, Any]) -> None:
    def build(**overrides) -> MaskRCNN:
        return maskrcnn_resnet_fpn(**{**kwargs, **overrides})

    build.__name__ = name
    build.__doc__ = f"Mask R-CNN of the shapes presets: ``maskrcnn_resnet_fpn(**SHAPES_MODELS[{name!r}])``."
    register_model(name)(build)


for _name, _kw in SHAPES_MODELS.items():
    _register_shapes_model(_name, _kw)
