"""SAM's prompt encoder: points and boxes to sparse tokens (random-Fourier positional
encoding plus learned type embeddings), a low-resolution mask to a dense embedding."""
import math
from typing import Optional, Tuple, Type

import torch
from torch import Tensor, nn

from .common import LayerNorm2d


class PositionEmbeddingRandom(nn.Module):
    """Random-Fourier positional encoding of coordinates in [0, 1]^2:
    ``[sin, cos](2 pi (2 xy - 1) @ G)`` with G ~ N(0, scale^2) of shape (2, num_pos_feats),
    a buffer saved in checkpoints (so copies of a model encode positions alike)."""

    def __init__(self, num_pos_feats: int = 64, scale: Optional[float] = None):
        super().__init__()
        if scale is None or scale <= 0.0:
            scale = 1.0
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((2, num_pos_feats)))

    def _pe_encoding(self, coords: Tensor) -> Tensor:
        coords = (2 * coords - 1) @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        return torch.cat([torch.sin(coords), torch.cos(coords)], dim=-1)

    def forward(self, size: Tuple[int, int]) -> Tensor:
        """The (C, h, w) encoding of the centres of an h x w grid."""
        h, w = size
        dev = self.positional_encoding_gaussian_matrix.device
        y = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5) / h
        x = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5) / w
        grid = torch.stack([x[None, :].expand(h, w), y[:, None].expand(h, w)], dim=-1)
        return self._pe_encoding(grid).permute(2, 0, 1)

    def forward_with_coords(self, coords: Tensor, image_size: Tuple[int, int]) -> Tensor:
        """Encodes pixel coordinates (..., 2) as (x, y) in an image of ``image_size`` (h, w)."""
        if not coords.is_floating_point():
            coords = coords.float()
        size = torch.tensor([float(image_size[1]), float(image_size[0])], dtype=coords.dtype, device=coords.device)
        # normalised in the coordinates' dtype (float64 from the mask generator), then float32
        return self._pe_encoding((coords / size).float())


class PromptEncoder(nn.Module):
    """Points (label 1 foreground, 0 background, -1 padding), boxes (two corner tokens) and
    masks (``4 * image_embedding_size``, downscaled by two stride-2 convolutions) to the
    mask decoder's sparse (B, N, embed_dim) and dense (B, embed_dim, h, w) embeddings."""

    def __init__(self, embed_dim: int, image_embedding_size: Tuple[int, int],
                 input_image_size: Tuple[int, int], mask_in_chans: int,
                 activation: Type[nn.Module] = nn.GELU):
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom(embed_dim // 2)
        self.num_point_embeddings = 4   # positive point, negative point, two box corners
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(4))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = (4 * image_embedding_size[0], 4 * image_embedding_size[1])
        self.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans // 4),
            activation(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2), LayerNorm2d(mask_in_chans),
            activation(),
            nn.Conv2d(mask_in_chans, embed_dim, kernel_size=1))
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> Tensor:
        """The (1, embed_dim, h, w) positional encoding of the image embedding's grid."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: Tensor, labels: Tensor, pad: bool) -> Tensor:
        points = points + 0.5   # to the pixel centre
        if pad:
            points = torch.cat([points, points.new_zeros(points.shape[0], 1, 2)], dim=1)
            labels = torch.cat([labels, -labels.new_ones(labels.shape[0], 1)], dim=1)
        emb = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        emb = torch.where(labels == -1, self.not_a_point_embed.weight, emb)
        emb = emb + torch.where(labels == 0, self.point_embeddings[0].weight, 0.0)
        emb = emb + torch.where(labels == 1, self.point_embeddings[1].weight, 0.0)
        return emb

    def _embed_boxes(self, boxes: Tensor) -> Tensor:
        corners = (boxes + 0.5).reshape(-1, 2, 2)
        emb = self.pe_layer.forward_with_coords(corners, self.input_image_size)
        corner_types = torch.cat([self.point_embeddings[2].weight, self.point_embeddings[3].weight])
        return emb + corner_types

    def _embed_masks(self, masks: Tensor) -> Tensor:
        return self.mask_downscaling(masks)

    @staticmethod
    def _batch_size(points, boxes, masks) -> int:
        if points is not None:
            return points[0].shape[0]
        if boxes is not None:
            return boxes.shape[0]
        if masks is not None:
            return masks.shape[0]
        return 1

    def _device(self):
        return self.point_embeddings[0].weight.device

    def forward(self, points: Optional[Tuple[Tensor, Tensor]], boxes: Optional[Tensor],
                masks: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
        """``points``: (coords (B, N, 2) in input-image pixels, labels (B, N)); ``boxes``
        (B, 4) XYXY; ``masks`` (B, 1, 4h, 4w) logits. Returns (sparse, dense)."""
        bs = self._batch_size(points, boxes, masks)
        parts = [torch.empty((bs, 0, self.embed_dim), device=self._device())]
        if points is not None:
            coords, labels = points
            if coords.dim() != 3 or coords.shape[-1] != 2 or labels.shape != coords.shape[:2]:
                raise ValueError(f"points: expected coords (B, N, 2) and labels (B, N), got "
                                 f"{tuple(coords.shape)} and {tuple(labels.shape)}")
            parts.append(self._embed_points(coords, labels, pad=boxes is None))
        if boxes is not None:
            if boxes.shape[-1] != 4 or boxes.reshape(-1, 4).shape[0] != bs:
                raise ValueError(f"boxes: expected ({bs}, 4) XYXY, got {tuple(boxes.shape)}")
            parts.append(self._embed_boxes(boxes))
        sparse = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if masks is not None:
            if masks.dim() != 4 or masks.shape[1] != 1 or tuple(masks.shape[-2:]) != self.mask_input_size:
                raise ValueError(f"masks: expected (B, 1, {self.mask_input_size[0]}, "
                                 f"{self.mask_input_size[1]}) logits, got {tuple(masks.shape)}")
            dense = self._embed_masks(masks)
        else:
            h, w = self.image_embedding_size
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(bs, -1, h, w)
        return sparse, dense
