"""Second stage: RoI box head (classification + class-specific box regression) and mask head,
their training targets and losses, and detection postprocessing. Pooling, NMS and the
projection of ground-truth masks go through instseg_ops."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import instseg_ops

from .boxes import BoxCoder, box_iou, clip_boxes, keep_min_size
from .matcher import BalancedSampler, Matcher


class TwoMLPHead(nn.Module):
    """Flatten the pooled RoI features, then two fully connected layers with ReLU."""

    def __init__(self, in_features: int, hidden: int = 1024):
        super().__init__()
        self.fc6 = nn.Linear(in_features, hidden)
        self.fc7 = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.fc7(F.relu(self.fc6(x.flatten(1)))))


class BoxPredictor(nn.Module):
    """Class logits (num_classes, background = 0) and per-class box deltas."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.cls_score = nn.Linear(in_features, num_classes)
        self.bbox_pred = nn.Linear(in_features, num_classes * 4)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = x.flatten(1)
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """``len(layers)`` 3x3 conv + ReLU blocks (named "0.0", "1.0", ...)."""

    def __init__(self, in_channels: int, layers=(256, 256, 256, 256), norm: Optional[str] = None):
        blocks = []
        c = in_channels
        for width in layers:
            block = [nn.Conv2d(c, width, 3, padding=1, bias=norm is None)]
            if norm == "gn":
                from .backbone import GroupNorm32
                block.append(GroupNorm32(width))
            elif norm is not None:
                from .backbone import norm_layer
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


def mask_targets(gt_masks: List[Tensor], proposals: List[Tensor], matched: List[Tensor], size: int,
                 aligned: bool = False) -> Tensor:
    """Ground-truth masks cropped to the positive proposals and resampled to size x size with
    instseg_ops.roi_align (the mask of proposal i is gt_masks[matched[i]]); ``aligned``: RoIAlign's
    half-pixel-correct sampling (cell j of a box x0..x1 samples x0 + (j + 0.5) (x1 - x0) / size in
    continuous coordinates, where pixel k's centre is k + 0.5)."""
    out = []
    for masks, boxes, idx in zip(gt_masks, proposals, matched):
        rois = torch.cat([idx.to(boxes)[:, None], boxes], dim=1)
        out.append(instseg_ops.roi_align(masks[:, None].to(rois), rois, (size, size), 1.0, aligned=aligned)[:, 0])
    return torch.cat(out) if out else proposals[0].new_zeros((0, size, size))


class RoIHeads(nn.Module):
    def __init__(self, box_roi_pool: nn.Module, box_head: nn.Module, box_predictor: nn.Module,
                 mask_roi_pool: Optional[nn.Module] = None, mask_head: Optional[nn.Module] = None,
                 mask_predictor: Optional[nn.Module] = None, fg_iou_thresh: float = 0.5, bg_iou_thresh: float = 0.5,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 bbox_reg_weights: Tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0),
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, detections_per_img: int = 100,
                 mask_positives_per_image: int = 0, aligned: bool = False):
        super().__init__()
        self.box_roi_pool, self.box_head, self.box_predictor = box_roi_pool, box_head, box_predictor
        self.mask_roi_pool, self.mask_head, self.mask_predictor = mask_roi_pool, mask_head, mask_predictor
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=False)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self.box_coder = BoxCoder(bbox_reg_weights)
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img
        if mask_positives_per_image < 0:
            raise ValueError(f"mask_positives_per_image must be >= 0, got {mask_positives_per_image}")
        # The mask loss uses at most this many positive RoIs per image (a random subset; 0: all).
        # Positives are many overlapping proposals of a few objects, so a subset keeps most of
        # the signal at a fraction of the mask head's cost.
        self.mask_positives_per_image = mask_positives_per_image
        self.aligned = aligned  # mask targets with RoIAlign(aligned=True); the RoI pools carry their own flag

    def has_mask(self) -> bool:
        return self.mask_predictor is not None

    # -- training targets
    def select_training_samples(self, proposals: List[Tensor], targets: List[Dict[str, Tensor]]):
        dtype, device = proposals[0].dtype, proposals[0].device
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        proposals = [torch.cat([p, g]) for p, g in zip(proposals, gt_boxes)]  # the ground truth is a proposal too
        matched, labels = [], []
        for p, g, lab in zip(proposals, gt_boxes, gt_labels):
            if g.numel() == 0:
                matched.append(torch.zeros(p.shape[0], dtype=torch.int64, device=device))
                labels.append(torch.zeros(p.shape[0], dtype=torch.int64, device=device))
                continue
            idx = self.matcher(box_iou(g, p))
            cls = lab[idx.clamp(min=0)].to(torch.int64)
            cls[idx == Matcher.BELOW_LOW_THRESHOLD] = 0
            cls[idx == Matcher.BETWEEN_THRESHOLDS] = -1
            matched.append(idx.clamp(min=0))
            labels.append(cls)
        pos, neg = self.sampler(labels)
        matched_boxes = []
        for i in range(len(proposals)):
            keep = torch.where(pos[i] | neg[i])[0]
            proposals[i], labels[i], matched[i] = proposals[i][keep], labels[i][keep], matched[i][keep]
            g = gt_boxes[i] if gt_boxes[i].numel() else torch.zeros((1, 4), dtype=dtype, device=device)
            matched_boxes.append(g[matched[i]])
        regression = self.box_coder.encode(matched_boxes, proposals)
        return proposals, matched, labels, regression

    @staticmethod
    def box_losses(class_logits: Tensor, box_regression: Tensor, labels: List[Tensor], regression: List[Tensor]):
        labels_all, reg_all = torch.cat(labels), torch.cat(regression)
        cls_loss = F.cross_entropy(class_logits, labels_all)
        pos = torch.where(labels_all > 0)[0]
        deltas = box_regression.reshape(box_regression.shape[0], -1, 4)
        box_loss = F.smooth_l1_loss(deltas[pos, labels_all[pos]], reg_all[pos], beta=1 / 9,
                                    reduction="sum") / labels_all.numel()
        return cls_loss, box_loss

    # -- inference
    def postprocess(self, class_logits: Tensor, box_regression: Tensor, proposals: List[Tensor],
                    image_shapes: List[Tuple[int, int]]):
        num_classes = class_logits.shape[-1]
        counts = [len(p) for p in proposals]
        boxes_all = self.box_coder.decode(box_regression, proposals).split(counts, 0)
        scores_all = F.softmax(class_logits, -1).split(counts, 0)
        results = []
        for boxes, scores, shape in zip(boxes_all, scores_all, image_shapes):
            boxes = clip_boxes(boxes, shape)
            labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
            boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
            keep = torch.where(scores > self.score_thresh)[0]
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = keep_min_size(boxes, 1e-2)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
            keep = instseg_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[: self.detections_per_img]
            results.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
        return results

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None):
        losses: Dict[str, Tensor] = {}
        if self.training:
            if targets is None:
                raise ValueError("RoIHeads: targets are required in training mode")
            for t in targets:
                if not t["boxes"].is_floating_point():
                    raise TypeError(f"target boxes must be floating point, got {t['boxes'].dtype}")
                if t["labels"].dtype != torch.int64:
                    raise TypeError(f"target labels must be int64, got {t['labels'].dtype}")
            proposals, matched, labels, regression = self.select_training_samples(proposals, targets)
        pooled = self.box_roi_pool(features, proposals, image_shapes)
        class_logits, box_regression = self.box_predictor(self.box_head(pooled))
        results: List[Dict[str, Tensor]] = []
        if self.training:
            cls_loss, box_loss = self.box_losses(class_logits, box_regression, labels, regression)
            losses = {"loss_classifier": cls_loss, "loss_box_reg": box_loss}
        else:
            results = self.postprocess(class_logits, box_regression, proposals, image_shapes)
        if self.has_mask():
            if self.training:
                pos = [torch.where(lab > 0)[0] for lab in labels]
                k = self.mask_positives_per_image
                if k > 0:
                    pos = [i[torch.randperm(i.numel(), device=i.device)[:k]] if i.numel() > k else i for i in pos]
                mask_boxes = [p[i] for p, i in zip(proposals, pos)]
                pos_matched = [m[i] for m, i in zip(matched, pos)]
            else:
                mask_boxes = [r["boxes"] for r in results]
            x = self.mask_roi_pool(features, mask_boxes, image_shapes)
            mask_logits = self.mask_predictor(self.mask_head(x))
            if self.training:
                gt_labels = [t["labels"][m] for t, m in zip(targets, pos_matched)]
                cls = torch.cat(gt_labels) if gt_labels else mask_logits.new_zeros((0,), dtype=torch.int64)
                tgt = mask_targets([t["masks"] for t in targets], mask_boxes, pos_matched, mask_logits.shape[-1],
                                   self.aligned)
                if tgt.numel() == 0:
                    losses["loss_mask"] = mask_logits.sum() * 0
                else:
                    chosen = mask_logits[torch.arange(cls.shape[0], device=cls.device), cls]
                    losses["loss_mask"] = F.binary_cross_entropy_with_logits(chosen, tgt)
            else:
                cls = torch.cat([r["labels"] for r in results])
                probs = mask_logits.sigmoid()[torch.arange(cls.shape[0], device=cls.device), cls][:, None]
                for r, p in zip(results, probs.split([len(r["boxes"]) for r in results], 0)):
                    r["masks"] = p
        return results, losses
