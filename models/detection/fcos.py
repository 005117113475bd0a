"""FCOS (Tian et al., 2019), the anchor-free detector of CenterMask, as centermask2's
``fcos.py`` / ``fcos_outputs.py``: the head, target assignment, losses and inference.

Class indices here are the foreground classes 0..K-1 (K = ``num_classes``); the model maps
them to and from the project's labels 1..K (0: background). Index K marks background
locations in the targets.
"""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import instseg_ops

from ..backbones.norms import GroupNorm32

INF = 1e8


class Scale(nn.Module):
    """A learnable scalar (init ``value``) that multiplies its input."""

    def __init__(self, value: float = 1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FCOSHead(nn.Module):
    """Classification and box towers (``num_convs`` x [3x3 conv with bias, GroupNorm(32),
    ReLU] each), shared across levels; predictors ``cls_logits`` (K), ``bbox_pred`` (4, then
    the level's learnable ``Scale`` and a ReLU: distances in stride units) and ``ctrness`` (1,
    from the box tower). Init: normal(std 0.01) weights and zero biases, the classification bias
    at the prior ``prior_prob``."""

    def __init__(self, in_channels: int, num_classes: int, num_convs: int = 4, num_levels: int = 5,
                 prior_prob: float = 0.01):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"FCOSHead: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes

        def tower():
            layers = []
            for _ in range(num_convs):
                layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1), GroupNorm32(in_channels), nn.ReLU()]
            return nn.Sequential(*layers)

        self.cls_tower = tower()
        self.bbox_tower = tower()
        self.cls_logits = nn.Conv2d(in_channels, num_classes, 3, padding=1)
        self.bbox_pred = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in range(num_levels)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """Per level: class logits [N, K, H, W], distances (l, t, r, b) in stride units
        [N, 4, H, W] (>= 0), centerness logits [N, 1, H, W]."""
        if len(features) != len(self.scales):
            raise ValueError(f"FCOSHead: {len(features)} feature levels, built for {len(self.scales)}")
        logits, regs, ctrs = [], [], []
        for feat, scale in zip(features, self.scales):
            c = self.cls_tower(feat)
            b = self.bbox_tower(feat)
            logits.append(self.cls_logits(c))
            regs.append(F.relu(scale(self.bbox_pred(b))))
            ctrs.append(self.ctrness(b))
        return logits, regs, ctrs


def level_locations(height: int, width: int, stride: int, device=None, dtype=torch.float32) -> Tensor:
    """Locations [H*W, 2] (x, y) of one level, row-major: (j * s + s // 2, i * s + s // 2)."""
    xs = torch.arange(width, device=device, dtype=dtype) * stride + stride // 2
    ys = torch.arange(height, device=device, dtype=dtype) * stride + stride // 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((x.reshape(-1), y.reshape(-1)), dim=1)


def size_ranges(sizes_of_interest: Sequence[float], num_levels: int) -> List[Tuple[float, float]]:
    """[-1, s0], [s0, s1], ..., [s_last, INF]: the range of max(l, t, r, b) each level takes."""
    if len(sizes_of_interest) != num_levels - 1:
        raise ValueError(f"sizes_of_interest needs {num_levels - 1} values for {num_levels} levels, "
                         f"got {len(sizes_of_interest)}")
    bounds = [-1.0] + [float(s) for s in sizes_of_interest] + [INF]
    return [(bounds[i], bounds[i + 1]) for i in range(num_levels)]


def fcos_targets(locations: List[Tensor], strides: Sequence[int], gt_boxes: Tensor, gt_classes: Tensor,
                 num_classes: int, sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
                 center_sample: bool = True, radius: float = 1.5) -> Tuple[Tensor, Tensor, Tensor]:
    """One image's targets for all locations (levels concatenated, finest first).

    A location is a candidate for a ground-truth box when it lies strictly inside it (with
    ``center_sample``: strictly inside the box's centre ``+-radius * stride``, clipped to the
    box) and the largest of its distances (l, t, r, b) to the full box lies in the level's size
    range (both ends inclusive). Among candidates it takes the box of smallest area (equal areas:
    the lowest index). Returns class indices [L] (``num_classes``: background), regression
    targets [L, 4] (l, t, r, b divided by the level's stride) and matched box indices [L]
    (-1: background)."""
    device = locations[0].device
    locs = torch.cat(locations)
    n_loc = locs.shape[0]
    counts = [len(lo) for lo in locations]
    if gt_boxes.numel() == 0:
        return (torch.full((n_loc,), num_classes, dtype=torch.int64, device=device),
                locs.new_zeros((n_loc, 4)), torch.full((n_loc,), -1, dtype=torch.int64, device=device))
    boxes = gt_boxes.to(locs.dtype)
    xs, ys = locs[:, 0:1], locs[:, 1:2]
    ltrb = torch.stack((xs - boxes[:, 0], ys - boxes[:, 1], boxes[:, 2] - xs, boxes[:, 3] - ys), dim=2)  # [L, G, 4]
    stride_per_loc = torch.cat([torch.full((c,), float(s), dtype=locs.dtype, device=device)
                                for c, s in zip(counts, strides)])
    if center_sample:
        cx = (boxes[:, 0] + boxes[:, 2]) * 0.5
        cy = (boxes[:, 1] + boxes[:, 3]) * 0.5
        r = stride_per_loc[:, None] * radius
        x0 = torch.maximum(cx - r, boxes[:, 0])
        y0 = torch.maximum(cy - r, boxes[:, 1])
        x1 = torch.minimum(cx + r, boxes[:, 2])
        y1 = torch.minimum(cy + r, boxes[:, 3])
        inside = torch.stack((xs - x0, ys - y0, x1 - xs, y1 - ys), dim=2).min(dim=2).values > 0
    else:
        inside = ltrb.min(dim=2).values > 0
    ranges = size_ranges(sizes_of_interest, len(locations))
    lo = torch.cat([torch.full((c,), r[0], dtype=locs.dtype, device=device) for c, r in zip(counts, ranges)])
    hi = torch.cat([torch.full((c,), r[1], dtype=locs.dtype, device=device) for c, r in zip(counts, ranges)])
    max_d = ltrb.max(dim=2).values
    cared = (max_d >= lo[:, None]) & (max_d <= hi[:, None])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    cand_area = torch.where(inside & cared, area[None, :].expand(n_loc, -1), torch.full_like(max_d, INF))
    min_area = cand_area.min(dim=1).values
    # the lowest index among the boxes of smallest area
    g = boxes.shape[0]
    idx = torch.where(cand_area == min_area[:, None], torch.arange(g, device=device)[None, :].expand(n_loc, -1),
                      torch.full((n_loc, g), g, dtype=torch.int64, device=device)).min(dim=1).values
    reg = ltrb[torch.arange(n_loc, device=device), idx] / stride_per_loc[:, None]
    background = min_area == INF
    cls = gt_classes.to(torch.int64)[idx]
    cls[background] = num_classes
    idx = idx.masked_fill(background, -1)
    return cls, reg, idx


def centerness_targets(reg: Tensor) -> Tensor:
    """sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) of targets [P, 4] (l, t, r, b)."""
    lr = reg[:, [0, 2]]
    tb = reg[:, [1, 3]]
    return torch.sqrt((lr.min(dim=1).values / lr.max(dim=1).values) * (tb.min(dim=1).values / tb.max(dim=1).values))


def giou_loss(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Sum of 1 - GIoU of boxes given as distances (l, t, r, b) from the same point, with
    centermask2's smoothing: IoU = (inter + 1) / (union + 1), GIoU = IoU - (enclosing - union) /
    enclosing; each term multiplied by ``weight`` when given."""
    pl, pt, pr, pb = pred.unbind(1)
    tl, tt, tr, tb = target.unbind(1)
    target_area = (tl + tr) * (tt + tb)
    pred_area = (pl + pr) * (pt + pb)
    w_inter = torch.min(pl, tl) + torch.min(pr, tr)
    h_inter = torch.min(pb, tb) + torch.min(pt, tt)
    w_enc = torch.max(pl, tl) + torch.max(pr, tr)
    h_enc = torch.max(pb, tb) + torch.max(pt, tt)
    enclosing = w_enc * h_enc
    inter = w_inter * h_inter
    union = target_area + pred_area - inter
    iou = (inter + 1.0) / (union + 1.0)
    giou = iou - (enclosing - union) / enclosing
    losses = 1 - giou
    return (losses * weight).sum() if weight is not None else losses.sum()


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed sigmoid focal loss (Lin et al. 2017)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.sum()


def _mean_over_processes(value: float) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return float(t.item()) / dist.get_world_size()
    return value


def _flatten(per_level: List[Tensor], channels: int) -> Tensor:
    """[N, C, H, W] per level -> [N, sum(H*W), C] (levels concatenated, row-major locations)."""
    return torch.cat([x.permute(0, 2, 3, 1).reshape(x.shape[0], -1, channels) for x in per_level], dim=1)


def fcos_losses(logits: List[Tensor], regs: List[Tensor], ctrs: List[Tensor], labels: Tensor, reg_targets: Tensor,
                num_classes: int, alpha: float = 0.25, gamma: float = 2.0) -> Dict[str, Tensor]:
    """centermask2's FCOS losses over a batch: ``labels`` [N, L] and ``reg_targets`` [N, L, 4]
    from ``fcos_targets``. Focal loss summed over every location and class divided by the
    positives (mean over processes, at least 1); GIoU loss of the positives weighted by their
    centerness target, divided by the centerness targets' sum (mean over processes, at least
    1e-6); centerness BCE summed and divided by the positives."""
    cls_pred = _flatten(logits, num_classes).reshape(-1, num_classes)
    reg_pred = _flatten(regs, 4).reshape(-1, 4)
    ctr_pred = _flatten(ctrs, 1).reshape(-1)
    labels = labels.reshape(-1)
    reg_targets = reg_targets.reshape(-1, 4)
    pos = torch.where(labels != num_classes)[0]
    num_pos = max(_mean_over_processes(float(pos.numel())), 1.0)
    cls_target = torch.zeros_like(cls_pred)
    cls_target[pos, labels[pos]] = 1.0
    loss_cls = sigmoid_focal_loss(cls_pred, cls_target, alpha, gamma) / num_pos
    reg_pred, reg_targets, ctr_pred = reg_pred[pos], reg_targets[pos], ctr_pred[pos]
    ctr_targets = centerness_targets(reg_targets)
    denorm = max(_mean_over_processes(float(ctr_targets.sum())), 1e-6)
    if pos.numel() > 0:
        loss_loc = giou_loss(reg_pred, reg_targets, ctr_targets) / denorm
        loss_ctr = F.binary_cross_entropy_with_logits(ctr_pred, ctr_targets, reduction="sum") / num_pos
    else:
        loss_loc = reg_pred.sum() * 0
        loss_ctr = ctr_pred.sum() * 0
    return {"loss_fcos_cls": loss_cls, "loss_fcos_loc": loss_loc, "loss_fcos_ctr": loss_ctr}


def fcos_inference(logits: List[Tensor], regs: List[Tensor], ctrs: List[Tensor], locations: List[Tensor],
                   strides: Sequence[int], score_thresh: float = 0.05, pre_nms_top_k: int = 1000,
                   nms_thresh: float = 0.6, post_nms_top_k: int = 50) -> List[Dict[str, Tensor]]:
    """Detections per image, as centermask2: per level, candidates with class probability >
    ``score_thresh`` (before the centerness), times the centerness, the ``pre_nms_top_k`` best;
    boxes (x - l, y - t, x + r, y + b) with the distances times the stride (not clipped);
    score sqrt(cls * ctr); levels together, class-aware NMS (``instseg_ops.batched_nms``), and
    scores at least the ``post_nms_top_k``-th largest (ties kept, as the reference's
    kthvalue). Returns ``boxes``, ``scores`` and ``classes`` (0..K-1) per image."""
    num_images = logits[0].shape[0]
    per_image: List[List[Tuple[Tensor, Tensor, Tensor]]] = [[] for _ in range(num_images)]
    for lg, rg, ct, loc, s in zip(logits, regs, ctrs, locations, strides):
        k = lg.shape[1]
        cls = lg.permute(0, 2, 3, 1).reshape(num_images, -1, k).sigmoid()
        box = rg.permute(0, 2, 3, 1).reshape(num_images, -1, 4) * s
        ctr = ct.permute(0, 2, 3, 1).reshape(num_images, -1).sigmoid()
        cand = cls > score_thresh
        cls = cls * ctr[:, :, None]
        for i in range(num_images):
            nz = torch.nonzero(cand[i])
            loc_idx, cls_idx = nz[:, 0], nz[:, 1]
            score = cls[i][loc_idx, cls_idx]
            if score.numel() > pre_nms_top_k:
                score, top = score.topk(pre_nms_top_k, sorted=False)
                loc_idx, cls_idx = loc_idx[top], cls_idx[top]
            d = box[i][loc_idx]
            p = loc[loc_idx].to(d.dtype)
            boxes = torch.stack((p[:, 0] - d[:, 0], p[:, 1] - d[:, 1], p[:, 0] + d[:, 2], p[:, 1] + d[:, 3]), dim=1)
            per_image[i].append((boxes, torch.sqrt(score), cls_idx))
    results = []
    for parts in per_image:
        boxes = torch.cat([p[0] for p in parts])
        scores = torch.cat([p[1] for p in parts])
        classes = torch.cat([p[2] for p in parts])
        keep = instseg_ops.batched_nms(boxes, scores, classes, nms_thresh)
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        n = scores.numel()
        if post_nms_top_k > 0 and n > post_nms_top_k:
            thresh = torch.kthvalue(scores.cpu(), n - post_nms_top_k + 1).values.item()
            keep = torch.where(scores >= thresh)[0]
            boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        results.append({"boxes": boxes, "scores": scores, "classes": classes})
    return results


class FCOS(nn.Module):
    """The FCOS proposal generator of CenterMask on the pyramid levels ``in_features``
    (strides ``strides``): ``forward(features, image_sizes, targets)`` returns ``(detections,
    losses)``. Training: losses (``loss_fcos_cls``, ``loss_fcos_loc``, ``loss_fcos_ctr``) and,
    computed without gradients, the detections with the training settings (used as proposals
    by the mask branch); evaluation: detections with the test settings. Targets' classes are
    0..K-1 (``classes``)."""

    def __init__(self, *, in_channels: int, num_classes: int, in_features: Sequence[str], strides: Sequence[int],
                 num_convs: int = 4, sizes_of_interest: Sequence[float] = (64, 128, 256, 512),
                 center_sample: bool = True, radius: float = 1.5, alpha: float = 0.25, gamma: float = 2.0,
                 score_thresh_train: float = 0.05, score_thresh_test: float = 0.05, pre_nms_top_k_train: int = 1000,
                 pre_nms_top_k_test: int = 1000, nms_thresh: float = 0.6, post_nms_top_k_train: int = 100,
                 post_nms_top_k_test: int = 50, prior_prob: float = 0.01):
        super().__init__()
        if len(in_features) != len(strides):
            raise ValueError("FCOS: in_features and strides differ in length")
        size_ranges(sizes_of_interest, len(in_features))  # validates
        self.head = FCOSHead(in_channels, num_classes, num_convs, len(in_features), prior_prob)
        self.num_classes = num_classes
        self.in_features, self.strides = list(in_features), [int(s) for s in strides]
        self.sizes_of_interest = tuple(sizes_of_interest)
        self.center_sample, self.radius, self.alpha, self.gamma = center_sample, radius, alpha, gamma
        self.score_thresh = {"train": score_thresh_train, "test": score_thresh_test}
        self.pre_nms_top_k = {"train": pre_nms_top_k_train, "test": pre_nms_top_k_test}
        self.post_nms_top_k = {"train": post_nms_top_k_train, "test": post_nms_top_k_test}
        self.nms_thresh = nms_thresh

    def locations(self, features: List[Tensor]) -> List[Tensor]:
        return [level_locations(f.shape[-2], f.shape[-1], s, f.device) for f, s in zip(features, self.strides)]

    def forward(self, features: Dict[str, Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        feats = [features[f] for f in self.in_features]
        logits, regs, ctrs = self.head(feats)
        locations = self.locations(feats)
        mode = "train" if self.training else "test"

        def detect():
            return fcos_inference([x.detach() for x in logits], [x.detach() for x in regs],
                                  [x.detach() for x in ctrs], locations, self.strides, self.score_thresh[mode],
                                  self.pre_nms_top_k[mode], self.nms_thresh, self.post_nms_top_k[mode])

        if not self.training:
            return detect(), {}
        if targets is None:
            raise ValueError("FCOS: targets are required in training mode")
        labels, reg_targets = [], []
        for t in targets:
            cls, reg, _ = fcos_targets(locations, self.strides, t["boxes"], t["classes"], self.num_classes,
                                       self.sizes_of_interest, self.center_sample, self.radius)
            labels.append(cls)
            reg_targets.append(reg)
        losses = fcos_losses(logits, regs, ctrs, torch.stack(labels), torch.stack(reg_targets), self.num_classes,
                             self.alpha, self.gamma)
        with torch.no_grad():
            detections = detect()
        return detections, losses
