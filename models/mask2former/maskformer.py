"""MaskFormer (Cheng et al., 2021): the per-pixel FPN decoder (``BasePixelDecoder``), a
6-layer DETR decoder over the backbone's last level, class and mask heads after every layer;
trained with focal (20) + dice (1) + class (1) losses on full masks with deep supervision.
It shares the matcher, the set criterion and the instance inference with Mask2Former."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backbones.resnet import ResNetBody
from ..registry import register_model
from .criterion import SetCriterion
from .matcher import HungarianMatcher
from .model import Mask2Former, _transform
from .pixel_decoder import _conv_gn, sine_position_embedding
from .transformer_decoder import MLP, PackedAttention


class FPNPixelDecoder(nn.Module):
    """MaskFormer's ``BasePixelDecoder``: ``layer_4`` (3x3 conv, GN, ReLU) on the coarsest
    level, then for each finer level ``adapter_k`` (1x1 conv, GN) + nearest-upsampled top-down,
    ``layer_k`` (3x3 conv, GN, ReLU); ``mask_features`` (3x3 conv) on the finest.
    ``forward(features)`` (finest first) returns (mask_features, [the coarsest backbone level])."""

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256):
        super().__init__()
        self.n = len(in_channels)
        for k, c in enumerate(in_channels, start=1):
            if k < self.n:
                self.add_module(f"adapter_{k}", _conv_gn(c, conv_dim, 1, bias=False))
                self.add_module(f"layer_{k}", _conv_gn(conv_dim, conv_dim, 3, bias=False, relu=True))
            else:
                self.add_module(f"layer_{k}", _conv_gn(c, conv_dim, 3, bias=False, relu=True))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 3, padding=1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, features: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        y = getattr(self, f"layer_{self.n}")(features[-1])
        for k in range(self.n - 1, 0, -1):
            lateral = getattr(self, f"adapter_{k}")(features[k - 1])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="nearest")
            y = getattr(self, f"layer_{k}")(y)
        return self.mask_features(y), [features[-1]]


class DetrDecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention (q = k = x + query_pos), cross-attention
    (q = x + query_pos, k = memory + pos, v = memory), FFN; each followed by add and LayerNorm."""

    def __init__(self, d_model: int = 256, n_heads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.1):
        super().__init__()
        self.self_attn = PackedAttention(d_model, n_heads, dropout)
        self.multihead_attn = PackedAttention(d_model, n_heads, dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor, query_pos: Tensor, memory: Tensor, pos: Tensor) -> Tensor:
        q = x + query_pos
        x = self.norm1(x + self.dropout(self.self_attn(q, q, x)))
        x = self.norm2(x + self.dropout(self.multihead_attn(x + query_pos, memory + pos, memory)))
        return self.norm3(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class DetrMaskPredictor(nn.Module):
    """MaskFormer's ``TransformerPredictor`` (no transformer encoder): queries start at zero
    with learned positions, 6 decoder layers over the projected coarsest level, and after
    every layer the shared LayerNorm, class Linear (K + 1) and 3-layer mask MLP."""

    def __init__(self, num_classes: int, in_channels: int, hidden_dim: int = 256, num_queries: int = 100,
                 n_heads: int = 8, dim_feedforward: int = 2048, num_layers: int = 6, mask_dim: int = 256,
                 dropout: float = 0.1):
        super().__init__()
        self.num_classes, self.hidden_dim = num_classes, hidden_dim
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(in_channels, hidden_dim, 1) if in_channels != hidden_dim else nn.Identity()
        if isinstance(self.input_proj, nn.Conv2d):
            nn.init.kaiming_uniform_(self.input_proj.weight, a=1)
            nn.init.zeros_(self.input_proj.bias)
        self.layers = nn.ModuleList(DetrDecoderLayer(hidden_dim, n_heads, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def forward(self, features: Sequence[Tensor], mask_features: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        src = self.input_proj(features[-1])
        b, c, h, w = src.shape
        pos = sine_position_embedding((h, w), self.hidden_dim // 2, src.device, src.dtype).flatten(1).T[None]
        memory = src.flatten(2).transpose(1, 2)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        x = torch.zeros_like(query_pos)
        all_cls, all_masks = [], []
        for layer in self.layers:
            x = layer(x, query_pos, memory, pos)
            y = self.decoder_norm(x)
            all_cls.append(self.class_embed(y))
            all_masks.append(torch.einsum("bqc,bchw->bqhw", self.mask_embed(y), mask_features))
        return all_cls, all_masks


class MaskFormer(Mask2Former):
    """MaskFormer with Mask2Former's interface (``forward``, ``logits``, ``forward_logits``):
    see ``Mask2Former``; ``pixel_decoder`` is an ``FPNPixelDecoder`` and ``predictor`` a
    ``DetrMaskPredictor``."""


@register_model()
def maskformer_resnet(depth: int = 50, num_classes: int = 81, norm: str = "frozen_bn", trainable_layers: int = 5,
                      width: int = 64, conv_dim: int = 256, mask_dim: int = 256, hidden_dim: int = 256,
                      num_queries: int = 100, n_heads: int = 8, dim_feedforward: int = 2048, dec_layers: int = 6,
                      dropout: float = 0.1, class_weight: float = 1.0, mask_weight: float = 20.0,
                      dice_weight: float = 1.0, no_object_weight: float = 0.1, test_topk: int = 100,
                      min_size=800, max_size: int = 1333, channels_last: Optional[bool] = None) -> MaskFormer:
    """MaskFormer on a ResNet body (the "R50" setting: the decoder reads res5, no transformer
    encoder), the reference's defaults: 100 queries, 6 decoder layers, dropout 0.1, matching
    and losses class 1 / focal 20 / dice 1 on full masks, no-object weight 0.1."""
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
    backbone = ResNetBody(depth, norm=norm, trainable_layers=trainable_layers, width=width)
    pixel_decoder = FPNPixelDecoder(backbone.out_channels, conv_dim, mask_dim)
    predictor = DetrMaskPredictor(num_classes - 1, backbone.out_channels[-1], hidden_dim, num_queries, n_heads,
                                  dim_feedforward, dec_layers, mask_dim, dropout)
    matcher = HungarianMatcher(class_weight, mask_weight, dice_weight, num_points=0, mask_cost="focal")
    criterion = SetCriterion(num_classes - 1, matcher, class_weight, mask_weight, dice_weight, no_object_weight,
                             num_points=0, mask_loss="focal")
    return MaskFormer(backbone=backbone, pixel_decoder=pixel_decoder, predictor=predictor, criterion=criterion,
                      transform=_transform(min_size, max_size, channels_last), test_topk=test_topk)


@register_model()
def maskformer_resnet50(num_classes: int = 81, **overrides) -> MaskFormer:
    """MaskFormer R50."""
    return maskformer_resnet(50, num_classes, **overrides)
