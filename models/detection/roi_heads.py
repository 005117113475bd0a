"""Second stage of two-stage detectors, with seams (as detectron2's ``StandardROIHeads``):

- ``label_and_sample``: proposals matched to the ground truth and sampled (usable without a
  box head: CenterMask trains its mask head on detector boxes this way);
- ``BoxStage``: one box stage (pooler, head, predictor, matcher, sampler, box coder with its
  weights, class-agnostic option): features of given boxes, its losses, box decoding. A
  cascade instantiates it three times;
- ``RoIHeads``: Mask R-CNN's second stage, ``_forward_box`` then ``_forward_mask``, and
  ``forward_with_given_boxes`` to run the mask stage on boxes from elsewhere.

Pooling, NMS and the mask targets go through instseg_ops; the RoI geometry convention is one
``RoIGeometry`` (``poolers.py``).
"""
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import instseg_ops

from ..backbones.norms import norm_layer
from .boxes import BoxCoder, box_iou, clip_boxes, keep_min_size
from .matcher import BalancedSampler, Matcher
from .poolers import RoIGeometry


class TwoMLPHead(nn.Module):
    """Flatten the pooled RoI features, then two fully connected layers with ReLU."""

    def __init__(self, in_features: int, hidden: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class logits (num_classes, background = 0) and box deltas: per class, or one set for
    all classes (``class_agnostic``, as the cascade stages)."""

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """``len(layers)`` 3x3 conv (+ norm) + ReLU blocks (named "0.0", "1.0", ...)."""

    def __init__(self, in_channels: int, layers=(256, 256, 256, 256), norm: Optional[str] = None):
        blocks = []
        c = in_channels
        for width in layers:
            block = [nn.Conv2d(c, width, 3, padding=1, bias=norm is None)]
            if norm is not None:
                block.append(norm_layer(norm)(width))
            block.append(nn.ReLU(inplace=True))
            blocks.append(nn.Sequential(*block))
            c = width
        super().__init__(*blocks)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


class MaskPredictor(nn.Module):
    """2x2 stride-2 transposed conv + ReLU (doubling the resolution), then 1x1 conv to one
    mask logit map per class."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int):
        super().__init__()
        self.conv5_mask = nn.ConvTranspose2d(in_channels, hidden, 2, 2)
        self.mask_fcn_logits = nn.Conv2d(hidden, num_classes, 1)
        for m in (self.conv5_mask, self.mask_fcn_logits):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mask_fcn_logits(F.relu(self.conv5_mask(x)))


# ---------------------------------------------------------------------------------------------
# training samples


@dataclass
class SampledProposals:
    """Per image: the sampled boxes, the index of the ground truth each is matched to, and its
    label (0: background)."""

    boxes: List[Tensor]
    matched: List[Tensor]
    labels: List[Tensor]
    # Per image, whether each sample is a ground-truth box added as a proposal (None: unknown).
    from_gt: Optional[List[Tensor]] = None

    def positives(self) -> List[Tensor]:
        return [torch.where(lab > 0)[0] for lab in self.labels]


def match_and_label(proposals: List[Tensor], targets: List[Dict[str, Tensor]],
                    matcher: Matcher) -> Tuple[List[Tensor], List[Tensor]]:
    """Per image, the index of the ground truth each proposal is matched to (0 where none) and
    its label: the ground truth's class, 0 below the matcher's low threshold (and for every
    proposal of an image without ground truth), -1 between the thresholds (ignored)."""
    matched, labels = [], []
    for p, t in zip(proposals, targets):
        g = t["boxes"].to(p.dtype)
        if g.numel() == 0 or p.shape[0] == 0:
            matched.append(torch.zeros(p.shape[0], dtype=torch.int64, device=p.device))
            labels.append(torch.zeros(p.shape[0], dtype=torch.int64, device=p.device))
            continue
        idx = matcher(box_iou(g, p))
        cls = t["labels"][idx.clamp(min=0)].to(torch.int64)
        cls[idx == Matcher.BELOW_LOW_THRESHOLD] = 0
        cls[idx == Matcher.BETWEEN_THRESHOLDS] = -1
        matched.append(idx.clamp(min=0))
        labels.append(cls)
    return matched, labels


def label_and_sample(proposals: List[Tensor], targets: List[Dict[str, Tensor]], matcher: Matcher,
                     sampler: BalancedSampler, add_gt: bool = True) -> SampledProposals:
    """Matches each image's proposals (plus its ground-truth boxes when ``add_gt``) to the
    ground truth with ``matcher``, labels them (``match_and_label``) and keeps the
    ``sampler``'s positives and negatives."""
    dtype = proposals[0].dtype
    counts = [p.shape[0] for p in proposals]
    if add_gt:
        proposals = [torch.cat([p, t["boxes"].to(dtype)]) for p, t in zip(proposals, targets)]
    matched, labels = match_and_label(proposals, targets, matcher)
    pos, neg = sampler(labels)
    out = SampledProposals([], [], [], [])
    for i, p in enumerate(proposals):
        keep = torch.where(pos[i] | neg[i])[0]
        out.boxes.append(p[keep])
        out.labels.append(labels[i][keep])
        out.matched.append(matched[i][keep])
        out.from_gt.append(keep >= counts[i])
    return out


def check_targets(targets: Optional[List[Dict[str, Tensor]]], who: str) -> List[Dict[str, Tensor]]:
    if targets is None:
        raise ValueError(f"{who}: targets are required in training mode")
    for t in targets:
        if not t["boxes"].is_floating_point():
            raise TypeError(f"target boxes must be floating point, got {t['boxes'].dtype}")
        if t["labels"].dtype != torch.int64:
            raise TypeError(f"target labels must be int64, got {t['labels'].dtype}")
    return targets


# ---------------------------------------------------------------------------------------------
# box stage


class BoxStage:
    """One box stage: pools the features of given boxes (``pooler``), runs ``head`` and
    ``predictor``, and owns the training rules of the stage: ``matcher`` and ``sampler`` (IoU
    thresholds, RoIs per image, positive fraction) and the ``box_coder`` with its weights.
    ``class_agnostic``: one regression for all classes.

    A plain object, not a module: the modules it uses are owned (and named in the state
    dict) by the heads that build it, so Mask R-CNN keeps torchvision's parameter names and a
    cascade can own three stages' modules in lists."""

    def __init__(self, *, pooler: nn.Module, head: nn.Module, predictor: nn.Module, box_coder: BoxCoder,
                 matcher: Matcher, sampler: BalancedSampler, class_agnostic: bool = False):
        self.pooler, self.head, self.predictor = pooler, head, predictor
        self.box_coder, self.matcher, self.sampler = box_coder, matcher, sampler
        self.class_agnostic = class_agnostic

    def sample(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]], add_gt: bool = True):
        """Labelled training samples and their regression targets under this stage's coder."""
        s = label_and_sample(proposals, targets, self.matcher, self.sampler, add_gt)
        return s, self.regression_targets(s, targets)

    def label(self, boxes: List[Tensor], targets: List[Dict[str, Tensor]]):
        """All ``boxes`` matched and labelled by this stage's matcher, without sampling and
        without adding the ground truth (a cascade's later stages relabel the refined boxes of
        the same RoIs this way), and their regression targets under this stage's coder."""
        matched, labels = match_and_label(boxes, targets, self.matcher)
        s = SampledProposals(list(boxes), matched, labels, [torch.zeros_like(m, dtype=torch.bool) for m in matched])
        return s, self.regression_targets(s, targets)

    def regression_targets(self, s: SampledProposals, targets: List[Dict[str, Tensor]]) -> List[Tensor]:
        """Each sample's matched ground-truth box encoded relative to it (a zero box where the
        image has none: those samples are negatives and take no box loss)."""
        matched_boxes = []
        for i, t in enumerate(targets):
            g = t["boxes"].to(s.boxes[i].dtype)
            if g.numel() == 0:
                g = torch.zeros((1, 4), dtype=s.boxes[i].dtype, device=s.boxes[i].device)
            matched_boxes.append(g[s.matched[i]])
        return self.box_coder.encode(matched_boxes, s.boxes)

    def __call__(self, features: Dict[str, Tensor], boxes: List[Tensor],
                 image_shapes: List[Tuple[int, int]]) -> Tuple[Tensor, Tensor]:
        """Class logits [R, K] and box deltas [R, 4K] (or [R, 4]) of all images' boxes."""
        return self.predictor(self.head(self.pooler(features, boxes, image_shapes)))

    @staticmethod
    def losses(class_logits: Tensor, box_deltas: Tensor, labels: List[Tensor],
               regression: List[Tensor], beta: float = 1 / 9) -> Tuple[Tensor, Tensor]:
        """Cross-entropy over the classes and smooth-L1 (``beta``: 1/9 is torchvision's, 0 is
        L1 as detectron2's) of the positives' deltas for their class, summed and divided by the
        number of samples (torchvision's). No samples at all: both losses are 0 (and keep the
        graph)."""
        labels_all, reg_all = torch.cat(labels), torch.cat(regression)
        if labels_all.numel() == 0:
            zero = class_logits.sum() * 0 + box_deltas.sum() * 0
            return zero, zero.clone()
        cls_loss = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        deltas = box_deltas.reshape(box_deltas.shape[0], -1, 4)
        cls = torch.zeros_like(labels_all[pos]) if deltas.shape[1] == 1 else labels_all[pos]
        box_loss = F.smooth_l1_loss(deltas[pos, cls], reg_all[pos], beta=beta,
                                    reduction="sum") / labels_all.numel()
        return cls_loss, box_loss

    def decode(self, box_deltas: Tensor, boxes: List[Tensor]) -> Tensor:
        """Decoded boxes [R, K or 1, 4] of all images' boxes."""
        return self.box_coder.decode(box_deltas, boxes)


def detect(boxes: Tensor, scores: Tensor, image_shape: Tuple[int, int], score_thresh: float, nms_thresh: float,
           detections_per_img: int) -> Dict[str, Tensor]:
    """One image's detections from per-class boxes [R, K, 4] (or [R, 1, 4]: class-agnostic)
    and class probabilities [R, K] (column 0: background): clip, drop the background, keep
    scores above ``score_thresh`` and boxes of at least 0.01 px, class-aware NMS through
    ``instseg_ops.batched_nms``, the ``detections_per_img`` best."""
    num_classes = scores.shape[-1]
    boxes = clip_boxes(boxes, image_shape)
    if boxes.shape[1] == 1:
        boxes = boxes.expand(-1, num_classes, 4)
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = keep_min_size(boxes, 1e-2)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = instseg_ops.batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return {"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]}


def mask_loss(mask_logits, features: Dict[str, Tensor], sampled: SampledProposals,
              image_shapes: List[Tuple[int, int]], targets: List[Dict[str, Tensor]], geometry: RoIGeometry,
              positives_per_image: int = 0) -> Tensor:
    """Binary cross-entropy of the mask logits (``mask_logits(features, boxes, image_shapes)``,
    [R, K, M, M]) of the sampled positives (at most ``positives_per_image`` random ones per
    image; 0: all) for their ground truth's class against ``geometry``'s mask targets; 0 (and
    the graph kept) without positives."""
    pos = sampled.positives()
    k = positives_per_image
    if k > 0:
        pos = [i[torch.randperm(i.numel(), device=i.device)[:k]] if i.numel() > k else i for i in pos]
    boxes = [b[i] for b, i in zip(sampled.boxes, pos)]
    matched = [m[i] for m, i in zip(sampled.matched, pos)]
    logits = mask_logits(features, boxes, image_shapes)
    gt_labels = [t["labels"][m] for t, m in zip(targets, matched)]
    cls = torch.cat(gt_labels) if gt_labels else logits.new_zeros((0,), dtype=torch.int64)
    tgt = geometry.mask_targets([t["masks"] for t in targets], boxes, matched, logits.shape[-1])
    if tgt.numel() == 0:
        return logits.sum() * 0
    chosen = logits[torch.arange(cls.shape[0], device=cls.device), cls]
    return F.binary_cross_entropy_with_logits(chosen, tgt)


# ---------------------------------------------------------------------------------------------
# Mask R-CNN's second stage


class RoIHeads(nn.Module):
    """Box stage, then mask stage (optional). Keyword-only; module names are torchvision's
    (``box_roi_pool``, ``box_head``, ``box_predictor``, ``mask_roi_pool``, ``mask_head``,
    ``mask_predictor``), so its checkpoints load with ``strict=True``.

    ``forward(features, proposals, image_shapes, targets)`` returns ``(detections, losses)``;
    ``forward_with_given_boxes(features, detections, image_shapes)`` adds ``masks`` to
    detections made elsewhere. ``mask_positives_per_image``: the mask loss uses at most this
    many randomly drawn positive RoIs per image (0: all, as torchvision)."""

    def __init__(self, *, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module,
                 mask_roi_pool: Optional[nn.Module] = None, mask_head: Optional[nn.Module] = None,
                 mask_predictor: Optional[nn.Module] = None, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 mask_positives_per_image: int = 0, geometry: RoIGeometry = RoIGeometry()):
        super().__init__()
        if mask_positives_per_image < 0:
            raise ValueError(f"mask_positives_per_image must be >= 0, got {mask_positives_per_image}")
        self.box_roi_pool, self.box_head, self.box_predictor = box_roi_pool, box_head, box_predictor
        self.mask_roi_pool, self.mask_head, self.mask_predictor = mask_roi_pool, mask_head, mask_predictor
        self.box_stage = BoxStage(pooler=box_roi_pool, head=box_head, predictor=box_predictor,
                                  box_coder=BoxCoder(bbox_reg_weights),
                                  matcher=Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False),
                                  sampler=BalancedSampler(batch_size_per_image, positive_fraction))
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        self.mask_positives_per_image = mask_positives_per_image
        self.geometry = geometry

    @property
    def aligned(self) -> bool:
        return self.geometry.aligned

    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    # -- box stage
    def _forward_box(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                     targets: Optional[List[Dict[str, Tensor]]]):
        """Training: ``(sampled proposals, {"loss_classifier", "loss_box_reg"})``;
        evaluation: ``(detections, {})``."""
        if self.training:
            sampled, regression = self.box_stage.sample(proposals, targets)
            class_logits, box_deltas = self.box_stage(features, sampled.boxes, image_shapes)
            cls_loss, box_loss = self.box_stage.losses(class_logits, box_deltas, sampled.labels, regression)
            return sampled, {"loss_classifier": cls_loss, "loss_box_reg": box_loss}
        class_logits, box_deltas = self.box_stage(features, proposals, image_shapes)
        counts = [len(p) for p in proposals]
        boxes = self.box_stage.decode(box_deltas, proposals).split(counts, 0)
        scores = F.softmax(class_logits, -1).split(counts, 0)
        return [detect(b, s, shape, self.score_thresh, self.nms_thresh, self.detections_per_img)
                for b, s, shape in zip(boxes, scores, image_shapes)], {}

    # -- mask stage
    def mask_logits(self, features: Dict[str, Tensor], boxes: List[Tensor],
                    image_shapes: List[Tuple[int, int]]) -> Tensor:
        """Per-class mask logits [R, K, M, M] of all images' boxes."""
        return self.mask_predictor(self.mask_head(self.mask_roi_pool(features, boxes, image_shapes)))

    def _forward_mask(self, features: Dict[str, Tensor], sampled: SampledProposals,
                      image_shapes: List[Tuple[int, int]], targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        """The mask loss on the sampled positives (at most ``mask_positives_per_image`` each)."""
        return {"loss_mask": mask_loss(self.mask_logits, features, sampled, image_shapes, targets, self.geometry,
                                       self.mask_positives_per_image)}

    def forward_with_given_boxes(self, features: Dict[str, Tensor], detections: List[Dict[str, Tensor]],
                                 image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        """Adds ``masks`` (probabilities [K, 1, M, M] of each detection's class) to detections
        (``boxes`` and ``labels`` per image) made by this or another box stage."""
        if not self.has_mask():
            return detections
        logits = self.mask_logits(features, [d["boxes"] for d in detections], image_shapes)
        cls = torch.cat([d["labels"] for d in detections])
        probs = logits.sigmoid()[torch.arange(cls.shape[0], device=cls.device), cls][:, None]
        for d, p in zip(detections, probs.split([len(d["boxes"]) for d in detections], 0)):
            d["masks"] = p
        return detections

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        if self.training:
            targets = check_targets(targets, "RoIHeads")
            sampled, losses = self._forward_box(features, proposals, image_shapes, targets)
            if self.has_mask():
                losses.update(self._forward_mask(features, sampled, image_shapes, targets))
            return [], losses
        detections, _ = self._forward_box(features, proposals, image_shapes, None)
        return self.forward_with_given_boxes(features, detections, image_shapes), {}
