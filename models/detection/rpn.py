"""Region proposal network: a shared 3x3 conv head over the pyramid, anchor decoding,
per-level top-k, NMS (through instseg_ops) and the objectness / box losses."""
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import instseg_ops

from .anchors import AnchorGenerator
from .boxes import BoxCoder, box_iou, clip_boxes, keep_min_size
from .matcher import BalancedSampler, Matcher


class RPNHead(nn.Module):
    """3x3 conv + ReLU, then 1x1 convs to A objectness logits and 4A box deltas per location."""

    def __init__(self, channels: int, num_anchors: int, conv_depth: int = 1):
        super().__init__()
        self.conv = nn.Sequential(*[nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True))
                                    for _ in range(conv_depth)])
        self.cls_logits = nn.Conv2d(channels, num_anchors, 1)
        self.bbox_pred = nn.Conv2d(channels, num_anchors * 4, 1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        logits, deltas = [], []
        for f in features:
            t = self.conv(f)
            logits.append(self.cls_logits(t))
            deltas.append(self.bbox_pred(t))
        return logits, deltas


def flatten_levels(logits: List[Tensor], deltas: List[Tensor]) -> Tuple[Tensor, Tensor]:
    """Per-level [N, A*C, H, W] maps to [N * sum(H*W*A), C] rows in anchor order (location, anchor)."""
    flat_logits, flat_deltas = [], []
    for lg, dl in zip(logits, deltas):
        n, a, h, w = lg.shape
        flat_logits.append(lg.permute(0, 2, 3, 1).reshape(n, -1, 1))
        flat_deltas.append(dl.reshape(n, a, 4, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, 4))
    return torch.cat(flat_logits, 1).flatten(0, -2), torch.cat(flat_deltas, 1).reshape(-1, 4)


class RegionProposalNetwork(nn.Module):
    def __init__(self, *, anchor_generator: AnchorGenerator, head: RPNHead, fg_iou_thresh: float = 0.7,
                 bg_iou_thresh: float = 0.3, batch_size_per_image: int = 256, positive_fraction: float = 0.5,
                 pre_nms_top_n: Dict[str, int] = None, post_nms_top_n: Dict[str, int] = None,
                 nms_thresh: float = 0.7, score_thresh: float = 0.0, min_size: float = 1e-3):
        super().__init__()
        self.anchor_generator = anchor_generator
        self.head = head
        self.box_coder = BoxCoder((1.0, 1.0, 1.0, 1.0))
        self.matcher = Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches=True)
        self.sampler = BalancedSampler(batch_size_per_image, positive_fraction)
        self._pre_nms_top_n = pre_nms_top_n or {"training": 2000, "testing": 1000}
        self._post_nms_top_n = post_nms_top_n or {"training": 2000, "testing": 1000}
        self.nms_thresh, self.score_thresh, self.min_size = nms_thresh, score_thresh, min_size

    def pre_nms_top_n(self) -> int:
        return self._pre_nms_top_n["training" if self.training else "testing"]

    def post_nms_top_n(self) -> int:
        return self._post_nms_top_n["training" if self.training else "testing"]

    def filter_proposals(self, proposals: Tensor, objectness: Tensor, image_sizes: List[Tuple[int, int]],
                         per_level: List[int]) -> List[Tensor]:
        n = proposals.shape[0]
        objectness = objectness.detach().reshape(n, -1)
        levels = torch.cat([torch.full((c,), i, dtype=torch.int64, device=proposals.device)
                            for i, c in enumerate(per_level)]).reshape(1, -1).expand_as(objectness)
        # Top-k objectness per level and image.
        picks, offset = [], 0
        for chunk in objectness.split(per_level, 1):
            k = min(self.pre_nms_top_n(), chunk.shape[1])
            picks.append(chunk.topk(k, dim=1).indices + offset)
            offset += chunk.shape[1]
        top = torch.cat(picks, dim=1)
        rows = torch.arange(n, device=proposals.device)[:, None]
        objectness, levels, proposals = objectness[rows, top], levels[rows, top], proposals[rows, top]
        probs = torch.sigmoid(objectness)
        out = []
        for boxes, scores, lvl, size in zip(proposals, probs, levels, image_sizes):
            boxes = clip_boxes(boxes, size)
            keep = keep_min_size(boxes, self.min_size)
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = torch.where(scores >= self.score_thresh)[0]
            boxes, scores, lvl = boxes[keep], scores[keep], lvl[keep]
            keep = instseg_ops.batched_nms(boxes, scores, lvl, self.nms_thresh)[: self.post_nms_top_n()]
            out.append(boxes[keep])
        return out

    def assign_targets(self, anchors: List[Tensor],
                       targets: List[Dict[str, Tensor]]) -> Tuple[List[Tensor], List[Tensor]]:
        labels, matched = [], []
        for a, t in zip(anchors, targets):
            gt = t["boxes"]
            if gt.numel() == 0:
                matched.append(torch.zeros_like(a))
                labels.append(torch.zeros(a.shape[0], dtype=torch.float32, device=a.device))
                continue
            idx = self.matcher(box_iou(gt, a))
            matched.append(gt[idx.clamp(min=0)])
            lab = (idx >= 0).to(torch.float32)
            lab[idx == Matcher.BELOW_LOW_THRESHOLD] = 0.0
            lab[idx == Matcher.BETWEEN_THRESHOLDS] = -1.0
            labels.append(lab)
        return labels, matched

    def losses(self, objectness: Tensor, deltas: Tensor, labels: List[Tensor], targets: List[Tensor]):
        pos, neg = self.sampler(labels)
        pos = torch.where(torch.cat(pos))[0]
        neg = torch.where(torch.cat(neg))[0]
        sampled = torch.cat([pos, neg])
        labels, targets = torch.cat(labels), torch.cat(targets)
        box_loss = F.smooth_l1_loss(deltas[pos], targets[pos], beta=1 / 9, reduction="sum") / sampled.numel()
        obj_loss = F.binary_cross_entropy_with_logits(objectness.flatten()[sampled], labels[sampled])
        return obj_loss, box_loss

    def forward(self, image_tensor_size: Tuple[int, int], image_sizes: List[Tuple[int, int]],
                features: Dict[str, Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        feats = list(features.values())
        logits, deltas = self.head(feats)
        anchors = self.anchor_generator(image_tensor_size, len(image_sizes), feats)
        per_level = [lg[0].numel() for lg in logits]  # H * W * A per level
        objectness, deltas = flatten_levels(logits, deltas)
        proposals = self.box_coder.decode(deltas.detach(), anchors).view(len(anchors), -1, 4)
        boxes = self.filter_proposals(proposals, objectness, image_sizes, per_level)
        losses = {}
        if self.training:
            if targets is None:
                raise ValueError("RPN: targets are required in training mode")
            labels, matched = self.assign_targets(anchors, targets)
            reg = self.box_coder.encode(matched, anchors)
            obj_loss, box_loss = self.losses(objectness, deltas, labels, list(reg))
            losses = {"loss_objectness": obj_loss, "loss_rpn_box_reg": box_loss}
        return boxes, losses
