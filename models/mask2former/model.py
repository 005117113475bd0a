"""Mask2Former (Cheng et al., 2022) for instance segmentation: a ResNet body, the
deformable-attention pixel decoder, the masked-attention transformer decoder, set losses and
the paper's instance inference; the builders are registered (``get_model``)."""
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.resnet import ResNetBody
from ..detection.transform import DetectionTransform
from ..engine.presets import Preset, register_preset
from ..registry import register_model
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def masks_to_boxes(masks: Tensor) -> Tensor:
    """Tight (x1, y1, x2, y2) boxes of bool masks [K, H, W] (pixel edges; zeros for empty masks)."""
    k = masks.shape[0]
    if k == 0:
        return masks.new_zeros((0, 4), dtype=torch.float32)
    h, w = masks.shape[-2:]
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y1 = torch.where(rows, ar_h, h).min(1).values
    y2 = torch.where(rows, ar_h, -1).max(1).values + 1
    x1 = torch.where(cols, ar_w, w).min(1).values
    x2 = torch.where(cols, ar_w, -1).max(1).values + 1
    boxes = torch.stack([x1, y1, x2, y2], 1).float()
    return torch.where(rows.any(1)[:, None], boxes, torch.zeros_like(boxes))


def instance_inference(class_logits: Tensor, mask_logits: Tensor, topk: int = 100,
                       resize: Optional[Callable[[Tensor], Tensor]] = None) -> Dict[str, Tensor]:
    """The paper's instance inference for one image: class probabilities (softmax without the
    no-object column) over all queries x classes, the ``topk`` best pairs (a query may appear
    with several classes), masks ``mask_logits > 0``, score = class probability x the mean
    mask probability inside the mask. No threshold, no NMS.

    Args:
        class_logits: Tensor[Q, K + 1].
        mask_logits: Tensor[Q, H, W] at the output resolution, or at any resolution that
            ``resize`` maps to it (it is then applied to the selected queries' masks only).
    Returns: ``scores`` [N], ``labels`` [N] (class indices 0..K-1), ``queries`` [N],
        ``masks`` bool [N, H, W], ``boxes`` [N, 4] (from the masks), N = min(topk, Q * K)."""
    q, k1 = class_logits.shape
    k = k1 - 1
    scores = class_logits.float().softmax(-1)[:, :-1].flatten()
    top = torch.topk(scores, min(topk, scores.numel()), sorted=True)
    labels = top.indices % k
    queries = torch.div(top.indices, k, rounding_mode="floor")
    if resize is None:
        m = mask_logits[queries].float()
    else:
        unique, inverse = torch.unique(queries, return_inverse=True)
        m = resize(mask_logits[unique].float())[inverse]
    binary = m > 0
    prob = m.sigmoid()
    mask_score = (prob * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return {"scores": top.values * mask_score, "labels": labels, "queries": queries, "masks": binary,
            "boxes": masks_to_boxes(binary)}


class Mask2Former(nn.Module):
    """``model(images, targets=None)`` as the project's other detectors: images is a list of
    float Tensor[3, H, W] in [0, 1], resized, normalised and padded by ``transform``. Training:
    targets are dicts with ``labels`` (int64 [T] in 1..num_classes-1) and ``masks`` (uint8
    [T, H, W]) (``boxes`` are optional); returns the loss dict (``loss_ce``,
    ``loss_mask``, ``loss_dice`` and the auxiliary ``loss_*_{i}``). Evaluation: one dict per
    image with ``boxes``, ``labels``, ``scores`` and ``masks`` (float [N, 1, H, W] of 0/1) in
    the input image's size, by the paper's instance inference (``instance_inference``) on the
    mask logits upsampled to the padded input, cropped and resized to the image.

    ``num_classes`` counts the background, as the other models (COCO: 81): the class head has
    num_classes outputs, index c is label c + 1 and the last is no-object.

    ``model.logits(pixel_values)`` takes a normalised padded batch [B, 3, H, W] (transformers'
    ``pixel_values``) and returns the final (class logits [B, Q, K + 1], mask logits
    [B, Q, H/4, W/4])."""

    def __init__(self, *, backbone: nn.Module, pixel_decoder: MSDeformAttnPixelDecoder,
                 predictor: MultiScaleMaskedTransformerDecoder, criterion: SetCriterion,
                 transform: DetectionTransform, test_topk: int = 100):
        super().__init__()
        self.backbone, self.pixel_decoder, self.predictor = backbone, pixel_decoder, predictor
        self.criterion, self.transform, self.test_topk = criterion, transform, test_topk

    def set_train_scale(self, scale: float) -> None:
        """Progressive resizing (training images resized to ``scale`` times the model's size)."""
        self.transform.train_scale = float(scale)

    def forward_logits(self, pixel_values: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        """Every prediction (the learnable queries' and each layer's): lists of class logits
        [B, Q, K + 1] and mask logits [B, Q, H/4, W/4]."""
        cl = self.transform.channels_last
        if cl or (cl is None and pixel_values.device.type == "cpu"):
            # as the transform's batches: oneDNN's CPU convolutions are faster channels_last
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        feats = self.backbone(pixel_values)
        feats = list(feats.values()) if isinstance(feats, dict) else list(feats)
        mask_features, multi_scale = self.pixel_decoder(feats)
        return self.predictor(multi_scale, mask_features)

    def logits(self, pixel_values: Tensor) -> Tuple[Tensor, Tensor]:
        cls, masks = self.forward_logits(pixel_values)
        return cls[-1], masks[-1]

    def _targets(self, targets: List[Dict[str, Tensor]], padded: Tuple[int, int]) -> List[Dict[str, Tensor]]:
        out = []
        for t in targets:
            labels = t["labels"].long()
            masks = t["masks"]
            if labels.numel() and (labels.min() < 1 or labels.max() >= self.predictor.num_classes + 1):
                raise ValueError(f"target labels must be in [1, {self.predictor.num_classes}], got "
                                 f"{labels.min().item()}..{labels.max().item()}")
            if masks.shape[0] != labels.shape[0]:
                raise ValueError(f"{masks.shape[0]} target masks for {labels.shape[0]} labels")
            full = masks.new_zeros((masks.shape[0],) + tuple(padded))
            full[:, : masks.shape[-2], : masks.shape[-1]] = masks
            out.append({"labels": labels - 1, "masks": full})
        return out

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        if self.training and targets is None:
            raise ValueError("Mask2Former: targets are required in training mode")
        original_sizes = [(int(i.shape[-2]), int(i.shape[-1])) for i in images]
        if targets is not None:  # the transform scales boxes: derive them from the masks if absent
            targets = [t if "boxes" in t else {**t, "boxes": masks_to_boxes(t["masks"].bool())} for t in targets]
        batch, sizes, targets = self.transform(images, targets)
        cls, masks = self.forward_logits(batch)
        if self.training:
            return self.criterion(cls, masks, self._targets(targets, tuple(batch.shape[-2:])))
        return self.postprocess(cls[-1], masks[-1], tuple(batch.shape[-2:]), sizes, original_sizes)

    @torch.no_grad()
    def postprocess(self, class_logits: Tensor, mask_logits: Tensor, padded: Tuple[int, int],
                    sizes: List[Tuple[int, int]], original_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        results = []
        for b, (size, orig) in enumerate(zip(sizes, original_sizes)):
            def resize(m: Tensor, size=size, orig=orig) -> Tensor:
                m = F.interpolate(m[None], size=padded, mode="bilinear", align_corners=False)[0]
                m = m[:, : size[0], : size[1]]
                return F.interpolate(m[None], size=orig, mode="bilinear", align_corners=False)[0]

            # The top-k pairs depend on the class scores only: only their queries' masks are resized.
            r = instance_inference(class_logits[b], mask_logits[b], self.test_topk, resize)
            results.append({"boxes": r["boxes"], "labels": r["labels"] + 1, "scores": r["scores"],
                            "masks": r["masks"][:, None].float()})
        return results


def _transform(min_size, max_size, channels_last: Optional[bool] = None) -> DetectionTransform:
    return DetectionTransform(min_size, max_size, IMAGENET_MEAN, IMAGENET_STD, size_divisible=32,
                              channels_last=channels_last)


@register_model()
def mask2former_resnet(depth: int = 50, num_classes: int = 81, norm: str = "frozen_bn", trainable_layers: int = 5,
                       width: int = 64, conv_dim: int = 256, mask_dim: int = 256, enc_layers: int = 6,
                       enc_heads: int = 8, enc_points: int = 4, enc_ffn: int = 1024, hidden_dim: int = 256,
                       num_queries: int = 100, dec_heads: int = 8, dec_ffn: int = 2048, dec_layers: int = 9,
                       dropout: float = 0.0, class_weight: float = 2.0, mask_weight: float = 5.0,
                       dice_weight: float = 5.0, no_object_weight: float = 0.1, train_num_points: int = 12544,
                       oversample_ratio: float = 3.0, importance_ratio: float = 0.75, test_topk: int = 100,
                       min_size=800, max_size: int = 1333, channels_last: Optional[bool] = None) -> Mask2Former:
    """Mask2Former on a ResNet body with the reference's defaults (instance segmentation,
    COCO: 100 queries, 9 decoder layers, 6 deformable encoder layers with FFN 1024, losses
    2/5/5 on 12544 points, top 100 at test time; images resized to 800/1333)."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    backbone = ResNetBody(depth, norm=norm, trainable_layers=trainable_layers, width=width)
    pixel_decoder = MSDeformAttnPixelDecoder(backbone.out_channels, conv_dim, mask_dim, enc_layers, enc_heads,
                                             enc_points, enc_ffn, dropout, strides=backbone.strides)
    predictor = MultiScaleMaskedTransformerDecoder(num_classes - 1, conv_dim, hidden_dim, num_queries, dec_heads,
                                                   dec_ffn, dec_layers, mask_dim, dropout)
    matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, train_num_points)
    criterion = SetCriterion(num_classes - 1, matcher, class_weight, mask_weight, dice_weight, no_object_weight,
                             train_num_points, oversample_ratio, importance_ratio)
    return Mask2Former(backbone=backbone, pixel_decoder=pixel_decoder, predictor=predictor, criterion=criterion,
                       transform=_transform(min_size, max_size, channels_last), test_topk=test_topk)


@register_model()
def mask2former_resnet50(num_classes: int = 81, **overrides) -> Mask2Former:
    """Mask2Former R50 (COCO instance: 80 classes + no-object)."""
    return mask2former_resnet(50, num_classes, **overrides)


@register_model()
def mask2former_resnet101(num_classes: int = 81, **overrides) -> Mask2Former:
    """Mask2Former R101."""
    return mask2former_resnet(101, num_classes, **overrides)


@register_model()
def mask2former_r18_shapes(num_classes: int = 7, **overrides) -> Mask2Former:
    """The ``shapes_mask2former_cpu`` preset's model, sized for 256 px synthetic shapes on a
    CPU: half-width ResNet-18 with GroupNorm (trained from scratch), 128-wide pixel decoder
    (3 encoder layers) and decoder (6 layers, 4 heads, 20 queries), 3136 training points."""
    kwargs = dict(norm="gn", width=32, conv_dim=128, mask_dim=128, enc_layers=3, enc_heads=4, enc_ffn=512,
                  hidden_dim=128, num_queries=20, dec_heads=4, dec_ffn=512, dec_layers=6, train_num_points=3136,
                  test_topk=50, min_size=256, max_size=256)
    kwargs.update(overrides)
    return mask2former_resnet(18, num_classes, **kwargs)


# Training preset (``python -m instseg_ops.models.train --preset shapes_mask2former_cpu``): the
# reference's solver (AdamW, lr 1e-4, weight decay 0.05, backbone at 0.1x, full-model gradient
# clipping at 0.01) on the 256 px shapes data, from scratch, for a 30-minute CPU run (a
# wall-time budget of 29 minutes, final evaluation included; ``--time-budget 59`` for 60).
register_preset(Preset(
    name="shapes_mask2former_cpu",
    arch="mask2former_r18_shapes",
    iters=50000, batch_size=4, optimizer="adamw", lr=1e-4, weight_decay=0.05, lr_multipliers={"backbone": 0.1},
    warmup_iters=50, milestones=(40000, 46000), gamma=0.1, time_budget=29.0, eval_period=1000, eval_images=50,
    checkpoint_period=1000, log_period=20, workers=0, clip_grad=0.01, cache_data=True,
))

# The same with a from-scratch solver: lr 4e-4, the backbone at the full rate (it is not
# pretrained here), 10 warmup iterations. Chosen from two 4-minute smoke runs on a shared
# machine only (benchmarks/RESULTS.md); the recorded runs decide between the two presets.
register_preset(Preset(
    name="shapes_mask2former_scratch_cpu",
    arch="mask2former_r18_shapes",
    iters=50000, batch_size=4, optimizer="adamw", lr=4e-4, weight_decay=0.05, lr_multipliers={},
    warmup_iters=10, milestones=(40000, 46000), gamma=0.1, time_budget=29.0, eval_period=1000, eval_images=50,
    checkpoint_period=1000, log_period=20, workers=0, clip_grad=0.01, cache_data=True,
))
