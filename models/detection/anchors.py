"""Anchor generator: per pyramid level, a grid of anchors of the level's sizes and aspect ratios."""
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn


class AnchorGenerator(nn.Module):
    """``sizes[l]`` and ``aspect_ratios[l]`` (h / w) for level l. At every feature location
    (shifted by the level's stride, in image pixels) the level's anchors are centred on the
    location's top-left corner, ordered location-major, then aspect ratio, then size; each
    anchor's half sizes are rounded to whole pixels. Anchor (h, w) for size s, ratio r:
    h = s * sqrt(r), w = s / sqrt(r)."""

    def __init__(self, sizes: Sequence[Sequence[int]] = ((32,), (64,), (128,), (256,), (512,)),
                 aspect_ratios: Sequence[Sequence[float]] = ((0.5, 1.0, 2.0),) * 5):
        super().__init__()
        if len(sizes) != len(aspect_ratios):
            raise ValueError("AnchorGenerator: one tuple of aspect ratios per tuple of sizes")
        self.sizes = [tuple(s) for s in sizes]
        self.aspect_ratios = [tuple(a) for a in aspect_ratios]
        self.cell_anchors = [self.cell(s, a) for s, a in zip(self.sizes, self.aspect_ratios)]

    @staticmethod
    def cell(sizes, ratios, dtype=torch.float32, device=None) -> Tensor:
        scales = torch.as_tensor(sizes, dtype=dtype, device=device)
        r = torch.as_tensor(ratios, dtype=dtype, device=device)
        h_ratio = torch.sqrt(r)
        w_ratio = 1 / h_ratio
        ws = (w_ratio[:, None] * scales[None, :]).view(-1)
        hs = (h_ratio[:, None] * scales[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(a) for s, a in zip(self.sizes, self.aspect_ratios)]

    def grid(self, feature_sizes: List[Tuple[int, int]], strides: List[Tuple[int, int]], dtype, device) -> List[Tensor]:
        out = []
        for (fh, fw), (sh, sw), base in zip(feature_sizes, strides, self.cell_anchors):
            base = base.to(dtype=dtype, device=device)
            xs = torch.arange(0, fw, dtype=torch.int32, device=device) * sw
            ys = torch.arange(0, fh, dtype=torch.int32, device=device) * sh
            y, x = torch.meshgrid(ys, xs, indexing="ij")
            x, y = x.reshape(-1), y.reshape(-1)
            shifts = torch.stack((x, y, x, y), dim=1)
            out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        return out

    def forward(self, image_tensor_size: Tuple[int, int], num_images: int, features: List[Tensor]) -> List[Tensor]:
        """Anchors (one Tensor[sum over levels of H*W*A, 4] per image) for a padded batch."""
        if len(features) != len(self.cell_anchors):
            raise ValueError(f"AnchorGenerator: {len(features)} feature maps but anchors for "
                             f"{len(self.cell_anchors)} levels")
        sizes = [tuple(f.shape[-2:]) for f in features]
        strides = [(image_tensor_size[0] // h, image_tensor_size[1] // w) for h, w in sizes]
        per_level = self.grid(sizes, strides, features[0].dtype, features[0].device)
        anchors = torch.cat(per_level)
        return [anchors for _ in range(num_images)]

