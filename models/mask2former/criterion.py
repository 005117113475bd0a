"""Set losses of Mask2Former and MaskFormer: Hungarian matching per prediction, softmax
cross-entropy over K + 1 classes (down-weighted no-object), and mask losses on the matched
pairs, applied to the final prediction and to every auxiliary one (deep supervision)."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .matcher import HungarianMatcher, point_sample, uncertain_point_coords


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Mean BCE with logits per mask, summed over masks, divided by num_masks."""
    return F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").mean(1).sum() / num_masks


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """1 - (2 sum(sigma * t) + 1) / (sum(sigma) + sum(t) + 1) per mask, summed, / num_masks."""
    s = inputs.sigmoid()
    loss = 1 - (2 * (s * targets).sum(-1) + 1) / (s.sum(-1) + targets.sum(-1) + 1)
    return loss.sum() / num_masks


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_masks: float, alpha: float = 0.25,
                       gamma: float = 2.0) -> Tensor:
    """RetinaNet's focal loss, mean over pixels per mask, summed, / num_masks."""
    prob = inputs.sigmoid()
    ce = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    return loss.mean(1).sum() / num_masks


class SetCriterion(nn.Module):
    """Args:
        num_classes: K.
        matcher: a ``HungarianMatcher``.
        class_weight, mask_weight, dice_weight: loss weights (Mask2Former 2, 5, 5; MaskFormer 1, 20, 1).
        no_object_weight: the no-object class's cross-entropy weight (0.1).
        num_points, oversample_ratio, importance_ratio: Mask2Former's importance-sampled mask
            losses (12544, 3.0, 0.75); ``num_points = 0`` computes them on the full masks
            (MaskFormer: predictions upsampled bilinearly to the targets' size).
        mask_loss: "bce" (Mask2Former) or "focal" (MaskFormer).

    ``forward(class_logits, mask_logits, targets)``: lists with one entry per prediction (the
    last is the final one); targets as ``HungarianMatcher``. Returns the weighted losses
    ``loss_ce``, ``loss_mask``, ``loss_dice`` of the final prediction and ``loss_ce_{i}``...
    of the auxiliary ones."""

    def __init__(self, num_classes: int, matcher: HungarianMatcher, class_weight: float = 2.0,
                 mask_weight: float = 5.0, dice_weight: float = 5.0, no_object_weight: float = 0.1,
                 num_points: int = 12544, oversample_ratio: float = 3.0, importance_ratio: float = 0.75,
                 mask_loss: str = "bce"):
        super().__init__()
        if mask_loss not in ("bce", "focal"):
            raise ValueError(f"mask_loss must be 'bce' or 'focal', got {mask_loss!r}")
        self.num_classes, self.matcher = num_classes, matcher
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points, self.oversample_ratio, self.importance_ratio = num_points, oversample_ratio, importance_ratio
        self.mask_loss = mask_loss
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = no_object_weight
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def loss_labels(self, class_logits: Tensor, targets, indices) -> Tensor:
        b, q, _ = class_logits.shape
        target_classes = torch.full((b, q), self.num_classes, dtype=torch.int64, device=class_logits.device)
        for i, (src, tgt) in enumerate(indices):
            if src.numel():
                target_classes[i, src.to(class_logits.device)] = targets[i]["labels"][tgt.to(targets[i]["labels"].device)]
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes,
                               self.empty_weight.to(class_logits.device))

    def loss_masks(self, mask_logits: Tensor, targets, indices, num_masks: float) -> Tuple[Tensor, Tensor]:
        src = torch.cat([mask_logits[i][s.to(mask_logits.device)] for i, (s, _) in enumerate(indices)])
        if src.shape[0] == 0:
            zero = mask_logits.sum() * 0.0
            return zero, zero.clone()
        tgt = torch.cat([targets[i]["masks"][t.to(targets[i]["masks"].device)] for i, (_, t) in enumerate(indices)])
        src = src.float()[:, None]
        tgt = tgt.to(src.dtype)[:, None]
        if self.num_points > 0:
            with torch.no_grad():
                coords = uncertain_point_coords(src, self.num_points, self.oversample_ratio, self.importance_ratio)
                labels = point_sample(tgt, coords)[:, 0]
            logits = point_sample(src, coords)[:, 0]
        else:
            logits = F.interpolate(src, size=tgt.shape[-2:], mode="bilinear", align_corners=False)[:, 0].flatten(1)
            labels = tgt[:, 0].flatten(1)
        mask_fn = sigmoid_ce_loss if self.mask_loss == "bce" else sigmoid_focal_loss
        return mask_fn(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    def single(self, class_logits: Tensor, mask_logits: Tensor, targets, num_masks: float) -> Dict[str, Tensor]:
        indices = self.matcher(class_logits, mask_logits, targets)
        loss_mask, loss_dice = self.loss_masks(mask_logits, targets, indices, num_masks)
        return {"loss_ce": self.loss_labels(class_logits, targets, indices), "loss_mask": loss_mask,
                "loss_dice": loss_dice}

    def forward(self, class_logits: Sequence[Tensor], mask_logits: Sequence[Tensor], targets: List[Dict[str, Tensor]],
                num_masks: Optional[float] = None) -> Dict[str, Tensor]:
        if num_masks is None:
            num_masks = self.num_masks(targets, class_logits[-1].device)
        losses = {}
        n = len(class_logits)
        for i, (c, m) in enumerate(zip(class_logits, mask_logits)):
            suffix = "" if i == n - 1 else f"_{i}"
            for k, v in self.single(c, m, targets, num_masks).items():
                losses[k + suffix] = v * self.weights[k]
        return losses

    @staticmethod
    def num_masks(targets, device) -> float:
        """Ground-truth masks in the batch, averaged over the processes, at least 1."""
        n = torch.tensor(float(sum(int(t["labels"].numel()) for t in targets)), device=device)
        world = 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(n)
            world = torch.distributed.get_world_size()
        return max(float(n.item()) / world, 1.0)
