"""Box utilities and the box coder (boxes are (x1, y1, x2, y2) in pixels)."""
import math
from typing import List, Tuple

import torch
from torch import Tensor


def box_area(boxes: Tensor) -> Tensor:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def box_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix [len(a), len(b)]."""
    lt = torch.max(a[:, None, :2], b[None, :, :2])
    rb = torch.min(a[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (box_area(a)[:, None] + box_area(b)[None, :] - inter)


def clip_boxes(boxes: Tensor, size: Tuple[int, int]) -> Tensor:
    h, w = size
    x = boxes[..., 0::2].clamp(min=0, max=w)
    y = boxes[..., 1::2].clamp(min=0, max=h)
    return torch.stack((x, y), dim=-1).reshape(boxes.shape)


def keep_min_size(boxes: Tensor, min_size: float) -> Tensor:
    """Indices of boxes whose width and height are both at least min_size."""
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return torch.where((w >= min_size) & (h >= min_size))[0]


class BoxCoder:
    """Encodes boxes as (dx, dy, dw, dh) offsets from reference boxes (R-CNN parameterisation),
    each scaled by ``weights``; decoding clamps dw, dh at log(1000 / 16)."""

    def __init__(self, weights: Tuple[float, float, float, float], clip: float = math.log(1000.0 / 16)):
        self.weights = weights
        self.clip = clip

    def encode(self, targets: List[Tensor], references: List[Tensor]) -> List[Tensor]:
        sizes = [len(r) for r in references]
        return self.encode_one(torch.cat(targets), torch.cat(references)).split(sizes, 0)

    def encode_one(self, targets: Tensor, references: Tensor) -> Tensor:
        wx, wy, ww, wh = (torch.tensor(w, dtype=references.dtype, device=references.device) for w in self.weights)
        rw = references[:, 2] - references[:, 0]
        rh = references[:, 3] - references[:, 1]
        rx = references[:, 0] + 0.5 * rw
        ry = references[:, 1] + 0.5 * rh
        tw = targets[:, 2] - targets[:, 0]
        th = targets[:, 3] - targets[:, 1]
        tx = targets[:, 0] + 0.5 * tw
        ty = targets[:, 1] + 0.5 * th
        return torch.stack((wx * (tx - rx) / rw, wy * (ty - ry) / rh, ww * torch.log(tw / rw),
                            wh * torch.log(th / rh)), dim=1)

    def decode(self, deltas: Tensor, references: List[Tensor]) -> Tensor:
        """deltas [sum(len(r)), 4 * k] -> boxes [sum(len(r)), k, 4]."""
        refs = torch.cat(references, dim=0)
        n = refs.shape[0]
        return self.decode_one(deltas.reshape(n, -1), refs).reshape(n, -1, 4)

    def decode_one(self, deltas: Tensor, references: Tensor) -> Tensor:
        references = references.to(deltas.dtype)
        w = references[:, 2] - references[:, 0]
        h = references[:, 3] - references[:, 1]
        cx = references[:, 0] + 0.5 * w
        cy = references[:, 1] + 0.5 * h
        wx, wy, ww, wh = self.weights
        dx, dy = deltas[:, 0::4] / wx, deltas[:, 1::4] / wy
        dw = (deltas[:, 2::4] / ww).clamp(max=self.clip)
        dh = (deltas[:, 3::4] / wh).clamp(max=self.clip)
        pcx = dx * w[:, None] + cx[:, None]
        pcy = dy * h[:, None] + cy[:, None]
        pw = torch.exp(dw) * w[:, None]
        ph = torch.exp(dh) * h[:, None]
        # Half sizes as (0.5 * size): the same rounding as the reference implementations.
        hw = torch.tensor(0.5, dtype=pcx.dtype, device=pw.device) * pw
        hh = torch.tensor(0.5, dtype=pcy.dtype, device=ph.device) * ph
        return torch.stack((pcx - hw, pcy - hh, pcx + hw, pcy + hh), dim=2).flatten(1)
