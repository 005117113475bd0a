"""Cascade Mask R-CNN (Cai and Vasconcelos, 2018): three box stages trained at rising IoU, each
refining the boxes of the one before, on Mask R-CNN's backbone, RPN and mask stage.

``CascadeRoIHeads`` is a loop over three ``BoxStage`` objects (its own box heads and
predictors, one shared box pooler); the mask stage is ``RoIHeads``' (inherited). Two variants
of the same model (``variant=``):

- ``"detectron2"`` (default; ``detectron2/modeling/roi_heads/cascade_rcnn.py``): stage losses
  summed with weight 1, the pooled features' gradient scaled by 1 / 3 before each stage's
  head, later stages relabel the detached refined boxes of the same RoIs (no re-sampling, no
  ground truth added), L1 box loss, one mask head trained on stage 0's foreground RoIs; at
  test time the mean of the stages' class probabilities.
- ``"mmdetection"`` (``mmdet/models/roi_heads/cascade_roi_head.py``): stage loss weights
  1 / 0.5 / 0.25, no gradient scaling, every stage re-samples its refined boxes with the
  ground truth added, smooth-L1 (beta 1) box loss, a mask head per stage trained on its own
  stage's samples; at test time the mean of the stages' class logits, and the mean of the
  mask heads' sigmoids.

Both: IoU 0.5 / 0.6 / 0.7, box-coder weights (10, 10, 5, 5) / (20, 20, 10, 10) /
(30, 30, 15, 15), class-agnostic regression, the last stage's boxes, score threshold 0.05,
class-aware NMS 0.5 (``instseg_ops.batched_nms``), 100 detections.
"""
import copy
import inspect
from functools import partial
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..detection.boxes import BoxCoder, clip_boxes
from ..detection.matcher import BalancedSampler, Matcher
from ..detection.poolers import RoIGeometry
from ..detection.roi_heads import (
    BoxPredictor,
    BoxStage,
    MaskHead,
    MaskPredictor,
    RoIHeads,
    SampledProposals,
    TwoMLPHead,
    detect,
    mask_loss,
)
from ..engine.presets import PRESETS, register_preset
from ..mask_rcnn import SHAPES_MODELS, MaskRCNN, maskrcnn_resnet_fpn
from ..registry import register_model
from ..weights import register_layout

STAGE_IOUS = (0.5, 0.6, 0.7)
STAGE_BBOX_REG_WEIGHTS = ((10.0, 10.0, 5.0, 5.0), (20.0, 20.0, 10.0, 10.0), (30.0, 30.0, 15.0, 15.0))

# What each variant means, as keyword arguments of CascadeRoIHeads (any can be overridden).
VARIANTS = {
    "detectron2": dict(stage_loss_weights=(1.0, 1.0, 1.0), scale_gradient=True, resample=False,
                       mask_per_stage=False, score_average="probs", box_loss_beta=0.0),
    "mmdetection": dict(stage_loss_weights=(1.0, 0.5, 0.25), scale_gradient=False, resample=True,
                        mask_per_stage=True, score_average="logits", box_loss_beta=1.0),
}


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``scale`` backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


def scale_gradient(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, its gradient multiplied by ``scale`` in the backward pass."""
    return _ScaleGradient.apply(x, scale)


class GradientScaledPooler:
    """Calls ``pooler`` and scales the gradient of the pooled features by ``scale``: the
    cascade's stages share one pooler, and detectron2 scales each stage's share of the gradient
    by 1 / number of stages ("equivalent to adding the losses among heads, but scale down the
    gradients on features")."""

    def __init__(self, pooler: nn.Module, scale: float):
        self.pooler, self.scale = pooler, scale

    def __call__(self, features: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]):
        return scale_gradient(self.pooler(features, boxes, image_shapes), self.scale)


class CascadeRoIHeads(RoIHeads):
    """The cascade's second stage. Module names: ``box_roi_pool`` (shared), ``box_head.{k}``,
    ``box_predictor.{k}`` (class-agnostic ``BoxPredictor``), ``mask_roi_pool``, ``mask_head``
    and ``mask_predictor`` (one module, or one per stage in ModuleLists with ``mask_per_stage``).
    ``self.stages`` are the ``BoxStage`` objects.

    Options (``VARIANTS`` names two sets of them): ``stage_ious`` (one matcher per stage,
    positives at or above it, negatives below), ``stage_bbox_reg_weights``,
    ``stage_loss_weights``, ``scale_gradient`` (pooled features' gradient times 1 / number of
    stages), ``resample`` (False: later stages relabel all refined boxes of stage 0's samples;
    True: they sample them again with the ground truth added, the refined ground-truth samples
    dropped first), ``score_average`` ("probs": mean of the stages' softmax; "logits": softmax
    of the mean logits), ``box_loss_beta`` (smooth-L1 beta; 0: L1).

    Training losses: ``loss_cls_stage{k}``, ``loss_box_reg_stage{k}`` (times the stage's
    weight) and ``loss_mask`` (or ``loss_mask_stage{k}`` with a mask head per stage)."""

    def __init__(self, *, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 mask_roi_pool: Optional[nn.Module] = None, mask_head=None, mask_predictor=None,
                 stage_ious: Sequence[float] = STAGE_IOUS,
                 stage_bbox_reg_weights: Sequence[Tuple[float, float, float, float]] = STAGE_BBOX_REG_WEIGHTS,
                 stage_loss_weights: Sequence[float] = (1.0, 1.0, 1.0), scale_gradient: bool = True,
                 resample: bool = False, mask_per_stage: bool = False, score_average: str = "probs",
                 box_loss_beta: float = 0.0, batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 mask_positives_per_image: int = 0, geometry: RoIGeometry = RoIGeometry()):
        nn.Module.__init__(self)  # RoIHeads' box stage is replaced by the stages below
        n = len(box_heads)
        lengths = {len(box_predictors), len(stage_ious), len(stage_bbox_reg_weights), len(stage_loss_weights)}
        if n == 0 or lengths != {n}:
            raise ValueError(f"CascadeRoIHeads: box_heads, box_predictors, stage_ious, stage_bbox_reg_weights and "
                             f"stage_loss_weights need one entry per stage, got lengths {len(box_heads)}, "
                             f"{len(box_predictors)}, {len(stage_ious)}, {len(stage_bbox_reg_weights)}, "
                             f"{len(stage_loss_weights)}")
        if any(p.bbox_pred.out_features != 4 for p in box_predictors):
            raise ValueError("CascadeRoIHeads: only class-agnostic box regression is supported "
                             "(BoxPredictor(..., class_agnostic=True))")
        if score_average not in ("probs", "logits"):
            raise ValueError(f"score_average must be 'probs' or 'logits', got {score_average!r}")
        if mask_per_stage and mask_head is not None and not (
                isinstance(mask_head, nn.ModuleList) and len(mask_head) == n and len(mask_predictor) == n):
            raise ValueError("mask_per_stage: mask_head and mask_predictor must be ModuleLists of one per stage")
        if mask_positives_per_image < 0:
            raise ValueError(f"mask_positives_per_image must be >= 0, got {mask_positives_per_image}")
        self.box_roi_pool = box_roi_pool
        self.box_head, self.box_predictor = nn.ModuleList(box_heads), nn.ModuleList(box_predictors)
        self.mask_roi_pool, self.mask_head, self.mask_predictor = mask_roi_pool, mask_head, mask_predictor
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.resample, self.mask_per_stage = resample, mask_per_stage
        self.score_average, self.box_loss_beta = score_average, box_loss_beta
        pooler = GradientScaledPooler(box_roi_pool, 1.0 / n) if scale_gradient else box_roi_pool
        self.stages = [
            BoxStage(pooler=pooler, head=h, predictor=p, box_coder=BoxCoder(tuple(w)),
                     matcher=Matcher(iou, iou, allow_low_quality_matches=False),
                     sampler=BalancedSampler(batch_size_per_image, positive_fraction), class_agnostic=True)
            for h, p, iou, w in zip(self.box_head, self.box_predictor, stage_ious, stage_bbox_reg_weights)]
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.mask_positives_per_image = mask_positives_per_image
        self.geometry = geometry

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @staticmethod
    def refine(stage: BoxStage, box_deltas: Tensor, boxes: List[Tensor],
               image_shapes: List[Tuple[int, int]]) -> List[Tensor]:
        """The next stage's input: ``stage``'s regression applied to ``boxes``, detached,
        clipped to the image."""
        decoded = stage.decode(box_deltas.detach(), boxes)[:, 0]
        return [clip_boxes(b, s) for b, s in zip(decoded.split([len(b) for b in boxes], 0), image_shapes)]

    # -- box stages
    def _forward_box(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                     targets: Optional[List[Dict[str, Tensor]]]):
        """Training: ``(each stage's samples, {"loss_cls_stage{k}", "loss_box_reg_stage{k}"})``;
        evaluation: ``(detections, {})``."""
        if self.training:
            return self._train_boxes(features, proposals, image_shapes, targets)
        boxes, logits, deltas = self.stage_outputs(features, proposals, image_shapes)
        scores = self.average_scores(logits)
        final = self.stages[-1].decode(deltas[-1], boxes[-1])
        detections = []
        for b, s, shape in zip(final.split([len(p) for p in boxes[-1]], 0), scores.split([len(p) for p in boxes[-1]], 0),
                               image_shapes):
            finite = torch.isfinite(b).all(dim=2).all(dim=1) & torch.isfinite(s).all(dim=1)
            detections.append(detect(b[finite], s[finite], shape, self.score_thresh, self.nms_thresh,
                                     self.detections_per_img))
        return detections, {}

    def stage_outputs(self, features: Dict[str, Tensor], proposals: List[Tensor],
                      image_shapes: List[Tuple[int, int]]):
        """Evaluation pass through the stages: per stage its input boxes (per image), class
        logits and box deltas."""
        boxes, logits, deltas = [proposals], [], []
        for k, stage in enumerate(self.stages):
            if k > 0:
                boxes.append(self.refine(self.stages[k - 1], deltas[-1], boxes[-1], image_shapes))
            cls, reg = stage(features, boxes[-1], image_shapes)
            logits.append(cls)
            deltas.append(reg)
        return boxes, logits, deltas

    def average_scores(self, logits: List[Tensor]) -> Tensor:
        """Class probabilities from the stages' logits: the mean of their softmax ("probs",
        detectron2's) or the softmax of their mean ("logits", mmdetection's)."""
        if self.score_average == "probs":
            return torch.stack([F.softmax(x, -1) for x in logits]).mean(0)
        return F.softmax(torch.stack(logits).mean(0), -1)

    def _train_boxes(self, features, proposals, image_shapes, targets):
        samples: List[SampledProposals] = []
        losses: Dict[str, Tensor] = {}
        boxes = proposals
        for k, stage in enumerate(self.stages):
            if k == 0 or self.resample:
                sampled, regression = stage.sample(boxes, targets)
            else:
                sampled, regression = stage.label(boxes, targets)
            cls, reg = stage(features, sampled.boxes, image_shapes)
            cls_loss, box_loss = BoxStage.losses(cls, reg, sampled.labels, regression, beta=self.box_loss_beta)
            w = self.stage_loss_weights[k]
            losses[f"loss_cls_stage{k}"] = cls_loss * w
            losses[f"loss_box_reg_stage{k}"] = box_loss * w
            samples.append(sampled)
            if k + 1 < self.num_stages:
                boxes = self.refine(stage, reg, sampled.boxes, image_shapes)
                # Training drops boxes that collapsed to no area; re-sampling drops the refined
                # ground-truth samples (the ground truth is added again).
                keep = [(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1]) for b in boxes]
                if self.resample:
                    keep = [m & ~g for m, g in zip(keep, sampled.from_gt)]
                boxes = [b[m] for b, m in zip(boxes, keep)]
        return samples, losses

    # -- mask stage
    def mask_logits(self, features: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]],
                    stage: int = 0) -> Tensor:
        """Per-class mask logits [R, K, M, M] of all images' boxes (of stage ``stage``'s mask
        head with ``mask_per_stage``)."""
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        if self.mask_per_stage:
            return self.mask_predictor[stage](self.mask_head[stage](pooled))
        return self.mask_predictor(self.mask_head(pooled))

    def _forward_mask(self, features: Dict[str, Tensor], samples: List[SampledProposals],
                      image_shapes: List[Tuple[int, int]], targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """One mask head: its loss on stage 0's sampled positives (``loss_mask``). A mask head
        per stage: each on its stage's samples, times the stage's weight (``loss_mask_stage{k}``)."""
        if not self.mask_per_stage:
            return {"loss_mask": mask_loss(self.mask_logits, features, samples[0], image_shapes, targets,
                                           self.geometry, self.mask_positives_per_image)}
        return {f"loss_mask_stage{k}": w * mask_loss(partial(self.mask_logits, stage=k), features, s, image_shapes,
                                                     targets, self.geometry, self.mask_positives_per_image)
                for k, (s, w) in enumerate(zip(samples, self.stage_loss_weights))}

    def forward_with_given_boxes(self, features: Dict[str, Tensor], detections: List[Dict[str, Tensor]],
                                 image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Adds ``masks`` to detections; with a mask head per stage, the mean of their sigmoids."""
        if not self.has_mask() or not self.mask_per_stage:
            return super().forward_with_given_boxes(features, detections, image_shapes)
        boxes = [d["boxes"] for d in detections]
        cls = torch.cat([d["labels"] for d in detections])
        rows = torch.arange(cls.shape[0], device=cls.device)
        probs = torch.stack([self.mask_logits(features, boxes, image_shapes, k)[rows, cls].sigmoid()
                             for k in range(self.num_stages)]).mean(0)[:, None]
        for d, p in zip(detections, probs.split([len(b) for b in boxes], 0)):
            d["masks"] = p
        return detections


class CascadeMaskRCNN(MaskRCNN):
    """Mask R-CNN with ``CascadeRoIHeads``: same inputs and outputs, training losses
    ``loss_cls_stage{k}``, ``loss_box_reg_stage{k}`` (k = 0, 1, 2), ``loss_mask`` (or
    ``loss_mask_stage{k}``), ``loss_objectness``, ``loss_rpn_box_reg``."""


def _box_predictor(in_features: int, num_classes: int) -> BoxPredictor:
    """Class-agnostic predictor with detectron2's initialisation (normal, std 0.01 for the
    logits and 0.001 for the deltas; zero biases)."""
    p = BoxPredictor(in_features, num_classes, class_agnostic=True)
    nn.init.normal_(p.cls_score.weight, std=0.01)
    nn.init.normal_(p.bbox_pred.weight, std=0.001)
    nn.init.zeros_(p.cls_score.bias)
    nn.init.zeros_(p.bbox_pred.bias)
    return p


_MASKRCNN_DEFAULTS = {k: v.default for k, v in inspect.signature(maskrcnn_resnet_fpn).parameters.items()}


@register_model()
def cascade_maskrcnn_resnet_fpn(variant: str = "detectron2", stage_ious: Sequence[float] = STAGE_IOUS,
                                stage_bbox_reg_weights=STAGE_BBOX_REG_WEIGHTS, **kwargs) -> CascadeMaskRCNN:
    """Cascade Mask R-CNN on a ResNet-FPN: the backbone, RPN, transform, poolers and mask stage
    of ``maskrcnn_resnet_fpn(**kwargs)`` (every keyword of it except the single box stage's
    ``box_fg_iou_thresh``, ``box_bg_iou_thresh`` and ``bbox_reg_weights``), with three box
    stages. ``variant``: "detectron2" or "mmdetection" (``VARIANTS``); its options
    (``stage_loss_weights``, ``scale_gradient``, ``resample``, ``mask_per_stage``,
    ``score_average``, ``box_loss_beta``) can be overridden one by one."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown cascade variant {variant!r}; known: {sorted(VARIANTS)}")
    single = {"box_fg_iou_thresh", "box_bg_iou_thresh", "bbox_reg_weights"} & set(kwargs)
    if single:
        raise ValueError(f"cascade_maskrcnn_resnet_fpn: {sorted(single)} belong to Mask R-CNN's single box stage; "
                         f"use stage_ious and stage_bbox_reg_weights")
    options = dict(VARIANTS[variant])
    for k in list(options):
        if k in kwargs:
            options[k] = kwargs.pop(k)
    base = maskrcnn_resnet_fpn(**kwargs)
    kw = {**_MASKRCNN_DEFAULTS, **kwargs}
    rh = base.roi_heads
    n = len(stage_ious)
    in_features = kw["fpn_channels"] * 7 * 7
    box_heads = [TwoMLPHead(in_features, kw["representation_size"]) for _ in range(n)]
    box_predictors = [_box_predictor(kw["representation_size"], kw["num_classes"]) for _ in range(n)]
    mask_head, mask_predictor = rh.mask_head, rh.mask_predictor
    if options["mask_per_stage"]:
        mask_head = nn.ModuleList([mask_head] + [MaskHead(kw["fpn_channels"], kw["mask_layers"], kw["head_norm"])
                                                 for _ in range(n - 1)])
        mask_predictor = nn.ModuleList([mask_predictor] + [
            MaskPredictor(kw["mask_layers"][-1], kw["mask_hidden"], kw["num_classes"]) for _ in range(n - 1)])
    heads = CascadeRoIHeads(
        box_roi_pool=rh.box_roi_pool, box_heads=box_heads, box_predictors=box_predictors,
        mask_roi_pool=rh.mask_roi_pool, mask_head=mask_head, mask_predictor=mask_predictor,
        stage_ious=stage_ious, stage_bbox_reg_weights=stage_bbox_reg_weights,
        batch_size_per_image=kw["box_batch_size_per_image"], positive_fraction=kw["box_positive_fraction"],
        score_thresh=kw["box_score_thresh"], nms_thresh=kw["box_nms_thresh"],
        detections_per_img=kw["box_detections_per_img"], mask_positives_per_image=kw["mask_positives_per_image"],
        geometry=rh.geometry, **options)
    return CascadeMaskRCNN(backbone=base.backbone, rpn=base.rpn, roi_heads=heads, transform=base.transform)


@register_model()
def cascade_maskrcnn_resnet50_fpn(num_classes: int = 91, **overrides) -> CascadeMaskRCNN:
    """Cascade Mask R-CNN on torchvision's ``maskrcnn_resnet50_fpn`` backbone, RPN, transform
    and mask stage (frozen BatchNorm, 800 / 1333, RoIAlign as torchvision). The backbone, FPN
    and RPN of a torchvision Mask R-CNN checkpoint load with ``load_pretrained(model, sd,
    strict=False)`` (layout "torchvision_maskrcnn_backbone"); the cascade's heads stay random
    and are reported as missing keys."""
    return cascade_maskrcnn_resnet_fpn(depth=50, num_classes=num_classes, **overrides)


# The shapes presets' models: the Mask R-CNN presets' backbones and settings.
CASCADE_SHAPES_MODELS = {
    "cascade_maskrcnn_r18_half_shapes": "maskrcnn_r18_half_shapes",
    "cascade_maskrcnn_tiny_shapes": "maskrcnn_tiny_shapes",
}


def _register_shapes_model(name: str, maskrcnn_name: str) -> None:
    def build(**overrides) -> CascadeMaskRCNN:
        return cascade_maskrcnn_resnet_fpn(**{**SHAPES_MODELS[maskrcnn_name], **overrides})

    build.__name__ = name
    build.__doc__ = (f"Cascade Mask R-CNN with the settings of {maskrcnn_name!r}: "
                     f"``cascade_maskrcnn_resnet_fpn(**SHAPES_MODELS[{maskrcnn_name!r}])``.")
    register_model(name)(build)


for _name, _base in CASCADE_SHAPES_MODELS.items():
    _register_shapes_model(_name, _base)


def _cascade_preset():
    """``shapes_r18_fast_cpu`` (same backbone, data, schedule and 29-minute wall budget) with
    the cascade's model."""
    p = copy.deepcopy(PRESETS["shapes_r18_fast_cpu"])
    p.name, p.arch = "shapes_cascade_r18_fast_cpu", "cascade_maskrcnn_r18_half_shapes"
    return p


register_preset(_cascade_preset())


# ---------------------------------------------------------------------------------------------
# weights


def _is_maskrcnn_for_cascade(sd, model) -> bool:
    return isinstance(model, CascadeMaskRCNN) and "roi_heads.box_head.fc6.weight" in sd


def _maskrcnn_backbone_and_rpn(sd, model) -> Dict[str, Tensor]:
    """The backbone (body and FPN) and RPN of a Mask R-CNN checkpoint (torchvision's names,
    which are Mask R-CNN's here too); BatchNorm step counters the model does not keep are
    dropped. The second stage's keys are left out: the cascade's heads are its own."""
    own = model.state_dict()
    return {k: v for k, v in sd.items() if k.startswith(("backbone.", "rpn.")) and
            not (k.endswith("num_batches_tracked") and k not in own)}


register_layout("torchvision_maskrcnn_backbone", _is_maskrcnn_for_cascade, _maskrcnn_backbone_and_rpn, first=True)
