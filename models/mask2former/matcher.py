"""Hungarian matching of query predictions to ground-truth masks (Mask2Former, MaskFormer)
and the point sampling both use."""
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn


def point_sample(features: Tensor, coords: Tensor) -> Tensor:
    """Bilinear samples of ``features`` [N, C, H, W] at ``coords`` [N, P, 2] (normalised
    (x, y) in [0, 1], align_corners=False, zeros outside): Tensor[N, C, P]."""
    out = F.grid_sample(features, 2.0 * coords[:, :, None, :] - 1.0, mode="bilinear", padding_mode="zeros",
                        align_corners=False)
    return out[..., 0]


def uncertain_point_coords(logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """PointRend's importance sampling (``get_uncertain_point_coords_with_randomness``):
    ``int(num_points * oversample_ratio)`` uniform points, of which the
    ``int(importance_ratio * num_points)`` most uncertain (uncertainty = -|logit|, sampled from
    ``logits`` [N, 1, H, W]) are kept, plus fresh uniform points up to ``num_points``.
    Returns Tensor[N, num_points, 2]."""
    if oversample_ratio < 1:
        raise ValueError(f"oversample_ratio must be >= 1, got {oversample_ratio}")
    if not 0 <= importance_ratio <= 1:
        raise ValueError(f"importance_ratio must be in [0, 1], got {importance_ratio}")
    n = logits.shape[0]
    sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, sampled, 2, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits, coords).abs()  # [N, 1, sampled]
    n_important = int(importance_ratio * num_points)
    n_random = num_points - n_important
    idx = torch.topk(uncertainty[:, 0, :], k=n_important, dim=1).indices
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if n_random > 0:
        chosen = torch.cat([chosen, torch.rand(n, n_random, 2, device=logits.device, generator=generator)], 1)
    return chosen


def pairwise_sigmoid_ce(inputs: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy with logits of every prediction [N, P] against every target
    [M, P]: Tensor[N, M]."""
    p = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    neg = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    return (pos @ targets.T + neg @ (1 - targets).T) / p


def pairwise_dice(inputs: Tensor, targets: Tensor) -> Tensor:
    """1 - (2 sum(sigma * t) + 1) / (sum(sigma) + sum(t) + 1) for every prediction [N, P] and
    target [M, P]: Tensor[N, M]."""
    s = inputs.sigmoid()
    numerator = 2 * (s @ targets.T)
    denominator = s.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def pairwise_sigmoid_focal(inputs: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Mean sigmoid focal loss of every prediction [N, P] against every target [M, P]:
    Tensor[N, M] (MaskFormer's matching cost)."""
    p = inputs.shape[1]
    prob = inputs.sigmoid()
    focal_pos = ((1 - prob) ** gamma) * F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs),
                                                                           reduction="none")
    focal_neg = (prob ** gamma) * F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs),
                                                                     reduction="none")
    if alpha >= 0:
        focal_pos = focal_pos * alpha
        focal_neg = focal_neg * (1 - alpha)
    return (focal_pos @ targets.T + focal_neg @ (1 - targets).T) / p


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets minimising
    ``cost_class * (-p(class)) + cost_mask * mask cost + cost_dice * dice cost``
    (``scipy.optimize.linear_sum_assignment``).

    Mask2Former (``num_points > 0``): the mask costs (mean BCE, dice) are computed on
    ``num_points`` points drawn uniformly once per image and shared by its predictions and
    targets. MaskFormer (``num_points = 0``, ``mask_cost="focal"``): on the full masks, the
    targets resized (nearest) to the predictions' size.

    ``forward(class_logits [B, Q, K + 1], mask_logits [B, Q, h, w], targets)`` with targets a
    list of dicts with ``labels`` (int64 [T], class indices 0..K-1) and ``masks`` ([T, H, W]);
    returns per image (query indices, target indices), int64 tensors of equal length
    min(Q, T), sorted by query."""

    def __init__(self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 num_points: int = 12544, mask_cost: str = "bce"):
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        if mask_cost not in ("bce", "focal"):
            raise ValueError(f"mask_cost must be 'bce' or 'focal', got {mask_cost!r}")
        self.cost_class, self.cost_mask, self.cost_dice = cost_class, cost_mask, cost_dice
        self.num_points, self.mask_cost = num_points, mask_cost

    @torch.no_grad()
    def cost_matrix(self, class_logits: Tensor, mask_logits: Tensor, labels: Tensor, masks: Tensor,
                    generator: Optional[torch.Generator] = None) -> Tensor:
        """The [Q, T] cost matrix of one image."""
        prob = class_logits.float().softmax(-1)
        cost_class = -prob[:, labels]
        out = mask_logits.float()
        tgt = masks.to(out.dtype)
        if self.num_points > 0:
            coords = torch.rand(1, self.num_points, 2, device=out.device, generator=generator)
            tgt = point_sample(tgt[:, None], coords.expand(tgt.shape[0], -1, -1))[:, 0]
            out = point_sample(out[:, None], coords.expand(out.shape[0], -1, -1))[:, 0]
        else:
            tgt = F.interpolate(tgt[:, None], size=out.shape[-2:], mode="nearest")[:, 0].flatten(1)
            out = out.flatten(1)
        mask_cost: Callable = pairwise_sigmoid_ce if self.mask_cost == "bce" else pairwise_sigmoid_focal
        return (self.cost_mask * mask_cost(out, tgt) + self.cost_class * cost_class
                + self.cost_dice * pairwise_dice(out, tgt))

    @torch.no_grad()
    def forward(self, class_logits: Tensor, mask_logits: Tensor, targets,
                generator: Optional[torch.Generator] = None) -> List[Tuple[Tensor, Tensor]]:
        out = []
        for b, t in enumerate(targets):
            labels = t["labels"]
            if labels.numel() == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                out.append((empty, empty.clone()))
                continue
            c = self.cost_matrix(class_logits[b], mask_logits[b], labels, t["masks"], generator)
            c = c.cpu()
            if not torch.isfinite(c).all():
                raise ValueError("HungarianMatcher: the cost matrix has non-finite entries")
            rows, cols = linear_sum_assignment(c.numpy())
            out.append((torch.as_tensor(np.asarray(rows), dtype=torch.int64),
                        torch.as_tensor(np.asarray(cols), dtype=torch.int64)))
        return out
