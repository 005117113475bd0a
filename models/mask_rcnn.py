"""Mask R-CNN (He et al., 2017) assembled from the pieces in this package."""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

import instseg_ops

from .anchors import AnchorGenerator
from .backbone import resnet_fpn_backbone
from .roi_heads import BoxPredictor, MaskHead, MaskPredictor, RoIHeads, TwoMLPHead
from .rpn import RegionProposalNetwork, RPNHead
from .transform import DetectionTransform

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MaskRCNN(nn.Module):
    """``model(images, targets=None)``: images is a list of float Tensor[3, H, W] in [0, 1].
    Training (``model.train()``): targets is a list of dicts with ``boxes`` (float [K, 4],
    x1 y1 x2 y2 pixels), ``labels`` (int64 [K], 0 is background) and ``masks`` (uint8
    [K, H, W]); returns the loss dict. Evaluation: returns one dict per image with ``boxes``,
    ``labels``, ``scores`` and ``masks`` (float [K, 1, H, W] probabilities) in the input
    images' coordinates."""

    def __init__(self, backbone: nn.Module, rpn: RegionProposalNetwork, roi_heads: RoIHeads,
                 transform: DetectionTransform):
        super().__init__()
        self.transform, self.backbone, self.rpn, self.roi_heads = transform, backbone, rpn, roi_heads

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
    ``maskrcnn_resnet50_fpn`` (its keyword names work as overrides). ``norm``: the backbone's
    normalisation ("frozen_bn" for pretrained weights, "bn" or "gn" to train from scratch);
    ``fpn_norm`` / ``head_norm``: optional normalisation in the FPN and mask head;
    ``channels_last``: memory format of the batched images (None: channels_last on the CPU,
    see ``DetectionTransform``); ``roi_level_rule`` / ``roi_canonical_scale``: which FPN level
    each RoI is pooled from (``instseg_ops.assign_levels``: "fpn" puts a box of side
    ``roi_canonical_scale`` on P4, sizes twice as large one level up; torchvision's 224 suits
    ~800 px images, smaller images want a proportionally smaller scale; "scale_adaptive" uses
    the box's share of the image area instead); ``mask_positives_per_image``: train the mask head on
    at most this many of an image's positive RoIs, drawn at random (0: all of them, as torchvision);
    ``aligned``: half-pixel-correct RoI geometry, as detectron2's ROIAlignV2: RoIAlign with
    ``aligned=True`` for the box and mask features and for the mask targets, and masks pasted
    with ``paste_masks(aligned=True)``. False (torchvision's geometry, for its weights) samples
    the features and the mask targets half a pixel away from the boxes; the mask head learns
    targets shifted by that half pixel, which the torchvision-style paste does not undo (the
    ``shapes_r18_fast_cpu`` preset: mask AP 0.544 with ``aligned=True`` against 0.489 without,
    in runs of equal length; see benchmarks/RESULTS.md)."""
    backbone = resnet_fpn_backbone(depth, norm, trainable_layers, fpn_channels, width, fpn_norm)
    anchors = AnchorGenerator(anchor_sizes, (tuple(aspect_ratios),) * len(anchor_sizes))
    rpn = RegionProposalNetwork(
        anchors, RPNHead(fpn_channels, anchors.num_anchors_per_location()[0]), rpn_fg_iou_thresh, rpn_bg_iou_thresh,
        rpn_batch_size_per_image, rpn_positive_fraction,
        {"training": rpn_pre_nms_top_n_train, "testing": rpn_pre_nms_top_n_test},
        {"training": rpn_post_nms_top_n_train, "testing": rpn_post_nms_top_n_test}, rpn_nms_thresh, rpn_score_thresh)
    levels = ["0", "1", "2", "3"]
    level_kw = dict(rule=roi_level_rule, canonical_scale=roi_canonical_scale, aligned=aligned)
    box_pool = instseg_ops.MultiScaleRoIAlign(levels, 7, 2, **level_kw)
    mask_pool = instseg_ops.MultiScaleRoIAlign(levels, 14, 2, **level_kw)
    heads = RoIHeads(
        box_pool, TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        BoxPredictor(representation_size, num_classes), mask_pool, MaskHead(fpn_channels, mask_layers, head_norm),
        MaskPredictor(mask_layers[-1], mask_hidden, num_classes), box_fg_iou_thresh, box_bg_iou_thresh,
        box_batch_size_per_image, box_positive_fraction, bbox_reg_weights, box_score_thresh, box_nms_thresh,
        box_detections_per_img, mask_positives_per_image, aligned)
    transform = DetectionTransform(min_size, max_size, image_mean, image_std, channels_last=channels_last,
                                   aligned=aligned)
    return MaskRCNN(backbone, rpn, heads, transform)


def maskrcnn_resnet50_fpn(num_classes: int = 91, **overrides) -> MaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` architecture and defaults; its state_dict loads
    with ``strict=True`` (see ``load_torchvision_weights``). Nothing is downloaded."""
    return maskrcnn_resnet_fpn(depth=50, num_classes=num_classes, **overrides)


def load_torchvision_weights(model: nn.Module, state_dict_or_path) -> nn.Module:
    """Loads a torchvision Mask R-CNN checkpoint (a state dict, or a path to one saved with
    torch.save, optionally wrapped as {"model": state_dict}) with strict key checking."""
    sd = state_dict_or_path
    if not isinstance(sd, dict):
        sd = torch.load(sd, map_location="cpu", weights_only=True)
        if "model" in sd and isinstance(sd["model"], dict):
            sd = sd["model"]
    sd = dict(sd)
    result = model.load_state_dict(sd, strict=False)
    # FrozenBatchNorm2d drops num_batches_tracked itself; anything else is a mismatch.
    missing = list(result.missing_keys)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"load_torchvision_weights: {len(missing)} missing keys (e.g. {missing[:3]}), "
                           f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
    return model
