"""CenterMask and CenterMask-Lite (Lee & Park, CVPR 2020), as centermask2: a VoVNetV2 body,
an FPN with P3-P7 (P6 from P5, P7 from relu(P6)), the anchor-free FCOS detector, and a mask
branch on the FCOS boxes: scale-adaptive RoI level assignment, the spatial-attention-guided
mask head (SAG-Mask) and the MaskIoU head (mask score = detection score x predicted mask IoU).

There is no box head: the FCOS detections are the final boxes. Builders (all registered):
``centermask_vovnet`` (any body and width) and the reference's configurations
``centermask_v39``, ``centermask_v57``, ``centermask_v99``, ``centermask_lite_v19``,
``centermask_lite_v39``, ``centermask_lite_v19_slim_dw``; ``centermask_lite_shapes`` is the
model of the ``shapes_centermask_lite_cpu`` training preset.

Labels follow the project's convention (0: background, 1..num_classes-1 the objects), so
``num_classes`` counts the background as Mask R-CNN's does (81 for COCO's 80 categories); the
FCOS classifier and the mask and MaskIoU predictors have ``num_classes - 1`` outputs.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import BackboneWithFPN, LastLevelP6P7
from .backbones.vovnet import vovnet
from .detection.boxes import clip_boxes, keep_min_size
from .detection.fcos import FCOS
from .detection.matcher import BalancedSampler, Matcher
from .detection.poolers import RoIGeometry
from .detection.roi_heads import label_and_sample
from .detection.transform import DetectionTransform
from .engine.presets import Preset, register_preset
from .mask_rcnn import IMAGENET_MEAN, IMAGENET_STD, SHAPES_NUM_CLASSES
from .registry import register_model


def _msra_fill(m: nn.Module) -> None:
    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    if m.bias is not None:
        nn.init.zeros_(m.bias)


class SpatialAttention(nn.Module):
    """SAM of SAG-Mask: x * sigmoid(conv([mean over channels, max over channels])), the conv
    2 -> 1 with a ``kernel`` x ``kernel`` window (3 or 7), no bias."""

    def __init__(self, kernel: int = 3):
        super().__init__()
        if kernel not in (3, 7):
            raise ValueError(f"SpatialAttention: kernel must be 3 or 7, got {kernel}")
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)
        _msra_fill(self.conv)

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.conv(pooled))


class SAGMaskHead(nn.Module):
    """SAG-Mask: ``num_convs`` x [3x3 conv (bias) + ReLU] of ``conv_dim`` channels, spatial
    attention, a 2x2 stride-2 transposed conv + ReLU (14 -> 28), and a 1x1 conv to one mask
    logit map per class."""

    def __init__(self, in_channels: int, num_classes: int, conv_dim: int = 256, num_convs: int = 4,
                 attention_kernel: int = 3):
        super().__init__()
        layers = []
        c = in_channels
        for _ in range(num_convs):
            layers += [nn.Conv2d(c, conv_dim, 3, padding=1), nn.ReLU(inplace=True)]
            c = conv_dim
        self.convs = nn.Sequential(*layers)
        self.attention = SpatialAttention(attention_kernel)
        self.deconv = nn.ConvTranspose2d(c, conv_dim, 2, stride=2)
        self.predictor = nn.Conv2d(conv_dim, num_classes, 1)
        for m in list(self.convs) + [self.deconv]:
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                _msra_fill(m)
        nn.init.normal_(self.predictor.weight, std=0.001)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attention(self.convs(x))
        return self.predictor(F.relu(self.deconv(x)))


class MaskIoUHead(nn.Module):
    """MaskIoU head (Mask Scoring R-CNN): the RoI features [R, C, S, S] concatenated with the
    2x2 max pool of the [R, 1, 2S, 2S] mask probabilities, ``num_convs`` 3x3 convs + ReLU (the
    last with stride 2), then fc 1024, fc 1024 (ReLU) and one predicted IoU per class."""

    def __init__(self, in_channels: int, num_classes: int, conv_dim: int = 256, num_convs: int = 4,
                 resolution: int = 14):
        super().__init__()
        if num_convs < 1:
            raise ValueError("MaskIoUHead: num_convs must be >= 1")
        layers = []
        c = in_channels + 1
        for i in range(num_convs):
            layers += [nn.Conv2d(c, conv_dim, 3, stride=2 if i == num_convs - 1 else 1, padding=1),
                       nn.ReLU(inplace=True)]
            c = conv_dim
        self.convs = nn.Sequential(*layers)
        out = (resolution + 1) // 2
        self.fc1 = nn.Linear(conv_dim * out * out, 1024)
        self.fc2 = nn.Linear(1024, 1024)
        self.predictor = nn.Linear(1024, num_classes)
        for m in list(self.convs) + [self.fc1, self.fc2]:
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.predictor.weight, std=0.01)
        nn.init.zeros_(self.predictor.bias)

    def forward(self, features: Tensor, mask_probs: Tensor) -> Tensor:
        x = torch.cat([features, F.max_pool2d(mask_probs, 2, 2)], dim=1)
        x = self.convs(x).flatten(1)
        return self.predictor(F.relu(self.fc2(F.relu(self.fc1(x)))))


def box_mask_fraction(masks: Tensor, boxes: Tensor, matched: Tensor) -> Tensor:
    """For each box, the fraction of its matched bitmask's pixels (``masks`` [G, H, W], pixel
    (i, j) covering the unit square at (j, i)) whose centres lie inside the box: the
    ratio centermask2 computes from polygons (area of the polygon cropped to the box over
    its full area), here from bitmasks through one integral image per matched mask."""
    if boxes.numel() == 0:
        return boxes.new_zeros((0,))
    h, w = masks.shape[-2:]
    used, inverse = torch.unique(matched, return_inverse=True)
    m = (masks[used] > 0).to(torch.int32)
    integral = F.pad(m.cumsum(1, dtype=torch.int32).cumsum(2, dtype=torch.int32), (1, 0, 1, 0))
    total = integral[:, -1, -1].to(boxes.dtype)
    # Pixel j's centre j + 0.5 lies in [x0, x1) iff ceil(x0 - 0.5) <= j < ceil(x1 - 0.5).
    b = boxes.detach()
    x0 = torch.ceil(b[:, 0] - 0.5).clamp(0, w).long()
    x1 = torch.ceil(b[:, 2] - 0.5).clamp(0, w).long()
    y0 = torch.ceil(b[:, 1] - 0.5).clamp(0, h).long()
    y1 = torch.ceil(b[:, 3] - 0.5).clamp(0, h).long()
    x1, y1 = torch.maximum(x1, x0), torch.maximum(y1, y0)
    inside = (integral[inverse, y1, x1] - integral[inverse, y0, x1] - integral[inverse, y1, x0]
              + integral[inverse, y0, x0]).to(boxes.dtype)
    return torch.where(total[inverse] > 0, inside / total[inverse].clamp(min=1), torch.zeros_like(inside))


def maskiou_targets(mask_logits: Tensor, gt_masks: Tensor, box_fraction: Tensor) -> Tensor:
    """MaskIoU targets (centermask2's ``mask_rcnn_loss`` with ``maskiou_on``): IoU of the
    binarised prediction (logit > 0) with the binary 28x28 target, where the union counts the
    ground truth's *full* area, estimated as its pixels in the box over the fraction of the
    object inside the box (``box_fraction``, clamped to [1e-10, 1])."""
    pred = (mask_logits > 0).to(gt_masks.dtype)
    ratio = box_fraction.to(gt_masks.dtype).clamp(0.0, 1.0).clamp(min=1e-10)
    full_area = gt_masks.sum(dim=(1, 2)) / ratio
    overlap = (pred * gt_masks).sum(dim=(1, 2)).clamp(min=0.0)
    union = (pred.sum(dim=(1, 2)) + full_area - overlap).clamp(min=1.0)
    return overlap / union


def maskiou_loss(pred_iou: Tensor, classes: Tensor, targets: Tensor, weight: float = 1.0) -> Tensor:
    """0.5 * (predicted IoU of the class - target)^2, averaged over the samples whose target is
    > 0 (zero, connected to the graph, when there are none)."""
    pos = torch.where(targets > 0)[0]
    if pos.numel() == 0:
        return pred_iou.sum() * 0
    diff = pred_iou[pos, classes[pos]] - targets[pos]
    return weight * (0.5 * diff * diff).sum() / pos.numel()


class CenterMaskHeads(nn.Module):
    """The mask branch on given boxes (centermask2's ``CenterROIHeads``): RoIs pooled from
    ``in_features`` with the scale-adaptive level rule (each image's unpadded size) through
    ``instseg_ops.multilevel_roi_align`` (aligned, adaptive sampling), SAG-Mask, and the
    MaskIoU head (``maskiou=False``: none, mask scores are the detection scores)."""

    def __init__(self, *, in_features: Sequence[str], in_channels: int, num_classes: int, conv_dim: int = 256,
                 num_convs: int = 4, maskiou: bool = True, maskiou_conv_dim: Optional[int] = None,
                 maskiou_num_convs: Optional[int] = None, pooler_resolution: int = 14, iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, maskiou_weight: float = 1.0,
                 geometry: RoIGeometry = RoIGeometry(aligned=True)):
        super().__init__()
        self.in_features = list(in_features)
        self.num_classes = num_classes
        self.geometry = geometry
        self.pooler = geometry.pooler(self.in_features, pooler_resolution, 0, rule="scale_adaptive")
        self.mask_head = SAGMaskHead(in_channels, num_classes, conv_dim, num_convs)
        self.maskiou_head = MaskIoUHead(in_channels, num_classes, maskiou_conv_dim or conv_dim,
                                        maskiou_num_convs or num_convs, pooler_resolution) if maskiou else None
        self.matcher = Matcher(iou_thresh, iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.maskiou_weight = maskiou_weight

    def pool(self, features: Dict[str, Tensor], boxes: List[Tensor], image_sizes: List[Tuple[int, int]]) -> Tensor:
        return self.pooler({k: features[k] for k in self.in_features}, boxes, image_sizes)

    def losses(self, features: Dict[str, Tensor], proposals: List[Tensor], image_sizes: List[Tuple[int, int]],
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """``loss_mask`` (and ``loss_maskiou``) on the foreground of the proposals (plus the
        ground truth) matched at IoU 0.5 and sampled."""
        with torch.no_grad():
            sampled = label_and_sample([p.detach() for p in proposals], targets, self.matcher, self.sampler)
        pos = sampled.positives()
        boxes = [b[i] for b, i in zip(sampled.boxes, pos)]
        matched = [m[i] for m, i in zip(sampled.matched, pos)]
        feats = self.pool(features, boxes, image_sizes)
        logits = self.mask_head(feats)
        classes = torch.cat([t["labels"][m] for t, m in zip(targets, matched)]) - 1
        gt = (self.geometry.mask_targets([t["masks"] for t in targets], boxes, matched, logits.shape[-1])
              >= 0.5).to(logits.dtype)
        chosen = logits[torch.arange(classes.shape[0], device=classes.device), classes]
        losses = {}
        if chosen.numel() == 0:
            losses["loss_mask"] = logits.sum() * 0
        else:
            losses["loss_mask"] = F.binary_cross_entropy_with_logits(chosen, gt)
        if self.maskiou_head is not None:
            with torch.no_grad():
                fraction = torch.cat([box_mask_fraction(t["masks"], b, m) for t, b, m in zip(targets, boxes, matched)])
                iou_target = maskiou_targets(chosen, gt, fraction)
            # As the reference: the probabilities are not detached, so the MaskIoU loss also
            # reaches the mask logits through the head's input.
            pred = self.maskiou_head(feats, chosen.sigmoid()[:, None])
            losses["loss_maskiou"] = maskiou_loss(pred, classes, iou_target, self.maskiou_weight)
        return losses

    def inference(self, features: Dict[str, Tensor], detections: List[Dict[str, Tensor]],
                  image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Adds ``masks`` (probabilities [K, 1, 28, 28] of each detection's class) and
        ``mask_scores`` (score x predicted mask IoU) to detections with ``boxes``, ``labels``
        (1..) and ``scores``."""
        boxes = [d["boxes"] for d in detections]
        feats = self.pool(features, boxes, image_sizes)
        logits = self.mask_head(feats)
        classes = torch.cat([d["labels"] for d in detections]) - 1
        rows = torch.arange(classes.shape[0], device=classes.device)
        probs = logits[rows, classes].sigmoid()[:, None]
        if self.maskiou_head is not None:
            iou = self.maskiou_head(feats, probs)[rows, classes]
        else:
            iou = torch.ones_like(classes, dtype=probs.dtype)
        counts = [len(b) for b in boxes]
        for d, p, q in zip(detections, probs.split(counts, 0), iou.split(counts, 0)):
            d["masks"] = p
            d["mask_scores"] = d["scores"] * q.to(d["scores"].dtype)
        return detections


class CenterMask(nn.Module):
    """``model(images, targets=None)`` with Mask R-CNN's interface: images are float
    Tensor[3, H, W] in [0, 1]; training targets have ``boxes`` (float [K, 4]), ``labels``
    (int64 [K], 1..num_classes-1) and ``masks`` (uint8 [K, H, W]); training returns
    ``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr``, ``loss_mask`` and ``loss_maskiou``;
    evaluation returns per image ``boxes`` (clipped to the image), ``labels``, ``scores`` (the
    FCOS scores, for box AP), ``masks`` (float [K, 1, H, W] probabilities, pasted with the
    unclipped boxes) and ``mask_scores`` (score x predicted mask IoU: the segm score)."""

    def __init__(self, *, backbone: nn.Module, fcos: FCOS, heads: CenterMaskHeads, transform: DetectionTransform):
        super().__init__()
        self.transform, self.backbone, self.fcos, self.roi_heads = transform, backbone, fcos, heads

    @property
    def num_classes(self) -> int:
        return self.fcos.num_classes + 1

    def set_train_scale(self, scale: float) -> None:
        self.transform.train_scale = float(scale)

    def _check_targets(self, images: List[Tensor], targets) -> None:
        if targets is None:
            raise ValueError("CenterMask: targets are required in training mode")
        if len(targets) != len(images):
            raise ValueError(f"CenterMask: {len(images)} images but {len(targets)} targets")
        for img, t in zip(images, targets):
            for key in ("boxes", "labels", "masks"):
                if key not in t:
                    raise ValueError(f"CenterMask: each target needs {key!r}")
            b, lab, m = t["boxes"], t["labels"], t["masks"]
            if b.dim() != 2 or b.shape[-1] != 4:
                raise ValueError(f"target boxes must be a Tensor[K, 4], got shape {tuple(b.shape)}")
            if not b.is_floating_point():
                raise TypeError(f"target boxes must be floating point, got {b.dtype}")
            if b.numel() and (b[:, 2:] <= b[:, :2]).any():
                raise ValueError("target boxes must have positive width and height")
            if lab.dtype != torch.int64 or lab.shape != (b.shape[0],):
                raise ValueError(f"target labels must be int64 [K] with K={b.shape[0]}, got {lab.dtype} "
                                 f"{tuple(lab.shape)}")
            if lab.numel() and (lab.min() < 1 or lab.max() >= self.num_classes):
                raise ValueError(f"target labels must be in [1, {self.num_classes - 1}], got "
                                 f"{int(lab.min())}..{int(lab.max())}")
            if m.dim() != 3 or m.shape[0] != b.shape[0] or tuple(m.shape[-2:]) != tuple(img.shape[-2:]):
                raise ValueError(f"target masks must be [K, H, W] with the image's size, got {tuple(m.shape)} for "
                                 f"{b.shape[0]} boxes and image {tuple(img.shape[-2:])}")

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        if self.training:
            self._check_targets(images, targets)
        original_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        batch, sizes, targets = self.transform(images, targets)
        features = self.backbone(batch)
        if self.training:
            fcos_targets = [{"boxes": t["boxes"], "classes": t["labels"] - 1} for t in targets]
            detections, losses = self.fcos(features, fcos_targets)
            losses.update(self.roi_heads.losses(features, [d["boxes"] for d in detections], sizes, targets))
            return losses
        detections, _ = self.fcos(features)
        results = []
        for d, size in zip(detections, sizes):
            # Boxes are pooled unclipped (as the reference); ones empty inside the image go.
            keep = keep_min_size(clip_boxes(d["boxes"], size), 1e-2)
            results.append({"boxes": d["boxes"][keep], "labels": d["classes"][keep] + 1, "scores": d["scores"][keep]})
        results = self.roi_heads.inference(features, results, sizes)
        results = self.transform.postprocess(results, sizes, original_sizes)
        for r, orig in zip(results, original_sizes):
            r["boxes"] = clip_boxes(r["boxes"], orig)
        return results


# ---------------------------------------------------------------------------------------------
# builders


@register_model()
def centermask_vovnet(body: str = "V-39", num_classes: int = 81, norm: str = "frozen_bn", fpn_channels: int = 256,
                      fpn_norm: Optional[str] = None, fcos_convs: int = 4, mask_conv_dim: Optional[int] = None,
                      mask_num_convs: int = 4, maskiou: bool = True, min_size=tuple(range(640, 801, 32)),
                      max_size: int = 1333, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                      sizes_of_interest=(64, 128, 256, 512), post_nms_top_k_test: int = 50,
                      post_nms_top_k_train: int = 100, pre_nms_top_k_train: int = 1000,
                      pre_nms_top_k_test: int = 1000, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                      mask_batch_size_per_image: int = 512, mask_positive_fraction: float = 0.25,
                      channels_last: Optional[bool] = None, body_width: float = 1.0) -> CenterMask:
    """CenterMask on a VoVNetV2 ``body`` (``vovnet`` names) with centermask2's defaults
    (CenterMask; the ``centermask_lite_*`` builders set the Lite values): FPN of ``fpn_channels``
    on stage3-stage5 plus P6/P7 from P5, FCOS with ``fcos_convs`` tower convs, SAG-Mask and
    MaskIoU heads of ``mask_num_convs`` x ``mask_conv_dim`` (default: ``fpn_channels``) on 14x14
    RoIs, images resized to a short side from ``min_size`` (training: a random one; test: the
    last) and at most ``max_size``. ``norm``: the body's normalisation ("frozen_bn", "bn",
    "gn"); ``fpn_norm``: optional normalisation in the FPN (the reference has none);
    ``body_width``: scales the body's channels (1.0: the reference's)."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    geometry = RoIGeometry(aligned=True)
    body_net = vovnet(body, norm, width=body_width)
    backbone = BackboneWithFPN(body_net, fpn_channels, fpn_norm,
                               LastLevelP6P7(fpn_channels, fpn_channels, use_p5=True, names=("p6", "p7")))
    levels = backbone.out_features
    fcos = FCOS(in_channels=fpn_channels, num_classes=num_classes - 1, in_features=levels,
                strides=[backbone.strides[f] for f in levels], num_convs=fcos_convs,
                sizes_of_interest=sizes_of_interest, score_thresh_train=score_thresh, score_thresh_test=score_thresh,
                pre_nms_top_k_train=pre_nms_top_k_train, pre_nms_top_k_test=pre_nms_top_k_test,
                nms_thresh=nms_thresh, post_nms_top_k_train=post_nms_top_k_train,
                post_nms_top_k_test=post_nms_top_k_test)
    heads = CenterMaskHeads(in_features=levels[:3], in_channels=fpn_channels, num_classes=num_classes - 1,
                            conv_dim=mask_conv_dim or fpn_channels, num_convs=mask_num_convs, maskiou=maskiou,
                            batch_size_per_image=mask_batch_size_per_image,
                            positive_fraction=mask_positive_fraction, geometry=geometry)
    transform = DetectionTransform(min_size, max_size, image_mean, image_std, channels_last=channels_last,
                                   geometry=geometry)
    return CenterMask(backbone=backbone, fcos=fcos, heads=heads, transform=transform)


LITE = dict(fpn_channels=128, fcos_convs=2, mask_num_convs=2, min_size=(580, 600), max_size=1000)


@register_model()
def centermask_v39(**overrides) -> CenterMask:
    """CenterMask V2-39 (``Base-CenterMask-VoVNet``: FPN 256, 4+4 FCOS convs, 4x256 heads)."""
    return centermask_vovnet(**{"body": "V-39", **overrides})


@register_model()
def centermask_v57(**overrides) -> CenterMask:
    """CenterMask V2-57."""
    return centermask_vovnet(**{"body": "V-57", **overrides})


@register_model()
def centermask_v99(**overrides) -> CenterMask:
    """CenterMask V2-99."""
    return centermask_vovnet(**{"body": "V-99", **overrides})


@register_model()
def centermask_lite_v19(**overrides) -> CenterMask:
    """CenterMask-Lite V2-19 (``Base-CenterMask-Lite-VoVNet``: FPN 128, 2+2 FCOS convs, 2x128
    heads, images 580/600 px short side, at most 1000)."""
    return centermask_vovnet(**{"body": "V-19", **LITE, **overrides})


@register_model()
def centermask_lite_v39(**overrides) -> CenterMask:
    """CenterMask-Lite V2-39."""
    return centermask_vovnet(**{"body": "V-39", **LITE, **overrides})


@register_model()
def centermask_lite_v19_slim_dw(**overrides) -> CenterMask:
    """CenterMask-Lite V2-19-Slim-DW."""
    return centermask_vovnet(**{"body": "V-19-slim-dw", **LITE, **overrides})


# The shapes preset's model: trainable GroupNorm in the body and the FPN (training from scratch),
# 256 px images, fewer RoIs per image (a few objects each).
SHAPES_CENTERMASK = dict(body="V-19-slim", num_classes=SHAPES_NUM_CLASSES, norm="gn", fpn_norm="gn",
                         body_width=0.5, fpn_channels=64, fcos_convs=2, mask_num_convs=2, min_size=256, max_size=256,
                         mask_batch_size_per_image=128, pre_nms_top_k_train=500, post_nms_top_k_train=50,
                         pre_nms_top_k_test=500)


@register_model()
def centermask_lite_shapes(**overrides) -> CenterMask:
    """The ``shapes_centermask_lite_cpu`` preset's model: CenterMask-Lite on a V-19-slim body
    with GroupNorm, FPN and heads of 64 channels, 256 px images."""
    return centermask_vovnet(**{**SHAPES_CENTERMASK, **overrides})


register_preset(Preset(
    # CenterMask-Lite from scratch on the 256 px shapes data, sized for 30 minutes of CPU
    # training (as shapes_r18_fast_cpu: a wall-time budget with the decays at 80% and 93% of
    # it, data cached in memory, progressive resizing); 90 s are kept for the final checkpoint and
    # the evaluation of the 200 val images (about 0.3-0.7 s per image when the machine is shared).
    name="shapes_centermask_lite_cpu",
    arch="centermask_lite_shapes",
    iters=20000, batch_size=4, lr=0.02, weight_decay=1e-4, warmup_iters=200, milestones=(15000, 18000),
    gamma=0.1, time_budget=29.0, budget_reserve_s=90.0, eval_period=1000, eval_images=50, checkpoint_period=1000,
    log_period=50, workers=0, clip_grad=10.0, cache_data=True, scale_schedule=((0.3, 0.625), (0.6, 0.75)),
))


__all__ = ["CenterMask", "CenterMaskHeads", "SAGMaskHead", "SpatialAttention", "MaskIoUHead", "box_mask_fraction",
           "maskiou_targets", "maskiou_loss", "centermask_vovnet", "centermask_v39", "centermask_v57",
           "centermask_v99", "centermask_lite_v19", "centermask_lite_v39", "centermask_lite_v19_slim_dw",
           "centermask_lite_shapes"]


# ---------------------------------------------------------------------------------------------
# centermask2 checkpoints (load_pretrained)

_CM2_RULES = [
    # body: backbone.bottom_up -> backbone.body, OrderedDict names "name/part" -> modules
    (r"^backbone\.bottom_up\.", "backbone.body."),
    (r"\.OSA(\d)_(\d+)\.layers\.(\d+)\.OSA\d_\d+_\d+/", r".osa\2.layers.\3."),
    (r"\.OSA(\d)_(\d+)\.concat\.OSA\d_\d+_concat/", r".osa\2.concat."),
    (r"\.OSA(\d)_(\d+)\.conv_reduction\.OSA\d_\d+_reduction_0/", r".osa\2.reduction."),
    (r"\.OSA(\d)_(\d+)\.ese\.", r".osa\2.ese."),
    (r"\.stem\.(stem_\d)/", r".stem.\1."),
    (r"\.dw_conv3x3\.", ".dw_conv."), (r"\.pw_conv1x1\.", ".pw_conv."), (r"\.pw_norm\.", ".norm."),
    # detectron2's FPN
    (r"^backbone\.fpn_lateral(\d)\.", lambda m: f"backbone.fpn.inner_blocks.{int(m.group(1)) - 3}.0."),
    (r"^backbone\.fpn_output(\d)\.", lambda m: f"backbone.fpn.layer_blocks.{int(m.group(1)) - 3}.0."),
    (r"^backbone\.top_block\.", "backbone.fpn.top_block."),
    # FCOS
    (r"^proposal_generator\.fcos_head\.", "fcos.head."),
    # SAG-Mask and MaskIoU heads
    (r"^roi_heads\.mask_head\.mask_fcn(\d+)\.", lambda m: f"roi_heads.mask_head.convs.{2 * int(m.group(1)) - 2}."),
    (r"^roi_heads\.mask_head\.spatialAtt\.", "roi_heads.mask_head.attention."),
    (r"^roi_heads\.maskiou_head\.maskiou_fcn(\d+)\.",
     lambda m: f"roi_heads.maskiou_head.convs.{2 * int(m.group(1)) - 2}."),
    (r"^roi_heads\.maskiou_head\.maskiou_fc(\d)\.", r"roi_heads.maskiou_head.fc\1."),
    (r"^roi_heads\.maskiou_head\.maskiou\.", "roi_heads.maskiou_head.predictor."),
]


def centermask2_key(key: str) -> str:
    """A centermask2 (detectron2) state-dict key -> this model's name."""
    import re
    for pattern, repl in _CM2_RULES:
        key = re.sub(pattern, repl, key)
    return key


def _is_centermask2(sd, model) -> bool:
    return isinstance(model, CenterMask) and any(k.startswith("backbone.bottom_up.stem.stem_1/") for k in sd)


def _from_centermask2(sd, model):
    """Renames centermask2's keys, drops its pixel mean/std buffers, reshapes the FCOS scales
    ([1] -> scalar) and flips the first conv's input channels: centermask2 takes BGR images,
    this model RGB (both normalised with the same ImageNet statistics)."""
    own = model.state_dict()
    out = {}
    for k, v in sd.items():
        if k in ("pixel_mean", "pixel_std") or k.endswith("num_batches_tracked"):
            continue
        name = centermask2_key(k)
        if name.startswith("fcos.head.scales.") and name in own:
            v = v.reshape(own[name].shape)
        if name == "backbone.body.stem.stem_1.conv.weight":
            v = v.flip(1)
        out[name] = v
    return out


def _register_layout():
    from .weights import register_layout
    register_layout("centermask2", _is_centermask2, _from_centermask2)


_register_layout()
