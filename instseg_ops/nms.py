"""Non-maximum suppression: ``nms`` and class-aware ``batched_nms``.

Drop-ins for ``torchvision.ops.nms`` / ``batched_nms`` with the same kept indices,
a stable order (ties in score break by lower index), per-category NMS without
the coordinate-offset trick, and optional ``max_output`` / ``score_threshold``.
"""
from typing import Optional

import torch
from torch import Tensor


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: Optional[int] = None,
        score_threshold: Optional[float] = None) -> Tensor:
    """Greedy NMS. Returns int64 indices of the kept boxes, by decreasing score (ties: lower index first).

    A box is suppressed when its IoU with a kept, higher-ranked box is strictly greater than
    ``iou_threshold``. Boxes are (x1, y1, x2, y2), areas ``(x2 - x1) * (y2 - y1)``; IoU is computed
    in float32 (float64 for float64 boxes). Boxes with a score below ``score_threshold``, or a
    non-finite score or coordinate, are never kept.
    """
    return torch.ops.instseg.nms(boxes, scores, None, float(iou_threshold),
                                 -1 if max_output is None else int(max_output),
                                 None if score_threshold is None else float(score_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_output: Optional[int] = None,
                score_threshold: Optional[float] = None) -> Tensor:
    """NMS independently per category ``idxs`` (integer Tensor[N]); same ordering rule as :func:`nms`.

    Boxes of different categories never interact (no coordinate offsets). ``max_output`` limits
    the merged result.
    """
    return torch.ops.instseg.nms(boxes, scores, idxs, float(iou_threshold),
                                 -1 if max_output is None else int(max_output),
                                 None if score_threshold is None else float(score_threshold))


@torch.library.register_fake("instseg::nms")
def _nms_fake(boxes, scores, idxs, iou_threshold, max_output=-1, score_threshold=None):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "nms: boxes must be a Tensor[N, 4]")
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0], lambda: "nms: scores must be a Tensor[N]")
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)
