"""Matching predictions to ground truth by IoU, and balanced positive/negative sampling."""
from typing import List, Tuple

import torch
from torch import Tensor


class Matcher:
    """For each prediction (column of the [gt, pred] quality matrix), the best ground truth,
    or BELOW_LOW_THRESHOLD (-1) when its best IoU < low, or BETWEEN_THRESHOLDS (-2) when in
    [low, high). With ``allow_low_quality_matches``, every prediction that ties for the best
    IoU of some ground truth keeps its best match even below the thresholds."""
    BELOW_LOW_THRESHOLD = -1
    BETWEEN_THRESHOLDS = -2

    def __init__(self, high: float, low: float, allow_low_quality_matches: bool = False):
        if low > high:
            raise ValueError(f"Matcher: low threshold {low} above high threshold {high}")
        self.high, self.low = high, low
        self.allow_low_quality_matches = allow_low_quality_matches

    def __call__(self, quality: Tensor) -> Tensor:
        if quality.numel() == 0:
            raise ValueError("Matcher: empty quality matrix (no ground truth or no predictions)")
        best, matches = quality.max(dim=0)
        original = matches.clone() if self.allow_low_quality_matches else None
        matches[best < self.low] = self.BELOW_LOW_THRESHOLD
        matches[(best >= self.low) & (best < self.high)] = self.BETWEEN_THRESHOLDS
        if original is not None:
            best_per_gt = quality.max(dim=1).values
            ties = torch.where(quality == best_per_gt[:, None])[1]
            matches[ties] = original[ties]
        return matches


class BalancedSampler:
    """Per image, up to ``batch_size_per_image`` labels: at most ``positive_fraction`` of them
    positive (label >= 1), the rest negative (label 0), each drawn uniformly without
    replacement with torch.randperm (positives first, then negatives).

    RNG use: per image, one ``torch.randperm(num_positive)`` then one
    ``torch.randperm(num_negative)``, the calls torchvision's BalancedPositiveNegativeSampler
    makes in the same order, so that after the same ``torch.manual_seed`` both pick the same
    positions. (Same positions give the same samples when the candidates come in the same
    order; instseg_ops' NMS orders tied scores by index, torchvision's leaves them unspecified.)"""

    def __init__(self, batch_size_per_image: int, positive_fraction: float):
        self.batch_size_per_image = batch_size_per_image
        self.positive_fraction = positive_fraction

    def __call__(self, labels: List[Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        pos_masks, neg_masks = [], []
        for lab in labels:
            pos = torch.where(lab >= 1)[0]
            neg = torch.where(lab == 0)[0]
            num_pos = min(pos.numel(), int(self.batch_size_per_image * self.positive_fraction))
            num_neg = min(neg.numel(), self.batch_size_per_image - num_pos)
            pick_pos = pos[torch.randperm(pos.numel(), device=pos.device)[:num_pos]]
            pick_neg = neg[torch.randperm(neg.numel(), device=neg.device)[:num_neg]]
            pm = torch.zeros_like(lab, dtype=torch.uint8)
            nm = torch.zeros_like(lab, dtype=torch.uint8)
            pm[pick_pos] = 1
            nm[pick_neg] = 1
            pos_masks.append(pm)
            neg_masks.append(nm)
        return pos_masks, neg_masks
