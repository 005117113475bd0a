"""Mask2Former's pixel decoder (``MSDeformAttnPixelDecoder``): a deformable-attention
encoder over the three coarsest backbone levels (strides 8/16/32) on instseg_ops'
``MSDeformAttn``, one FPN level at stride 4 and the mask-feature projection.
"""
import math
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from instseg_ops import MSDeformAttn


def sine_position_embedding(shape: Tuple[int, int], num_pos_feats: int, device, dtype=torch.float32,
                            temperature: float = 10000.0) -> Tensor:
    """DETR's normalised sine positional encoding of an (H, W) grid without padding:
    Tensor[2 * num_pos_feats, H, W] (y features first, then x; each interleaves sin and cos).
    Positions are (i + 1) / (H + 1e-6) * 2 pi, as the reference's cumulative sum of ones."""
    h, w = shape
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)
    y = y / (y[-1:] + eps) * scale
    x = x / (x[-1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    py = y[:, None] / dim_t  # [H, F]
    px = x[:, None] / dim_t  # [W, F]
    py = torch.stack((py[:, 0::2].sin(), py[:, 1::2].cos()), dim=2).flatten(1)
    px = torch.stack((px[:, 0::2].sin(), px[:, 1::2].cos()), dim=2).flatten(1)
    pos = torch.cat((py[:, None, :].expand(h, w, num_pos_feats), px[None, :, :].expand(h, w, num_pos_feats)), 2)
    return pos.permute(2, 0, 1).to(dtype)


def _conv_gn(cin: int, cout: int, kernel: int, bias: bool, relu: bool = False, groups: int = 32) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias), nn.GroupNorm(groups, cout)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention (query = src + pos, value = src),
    add, LayerNorm; FFN (ReLU), add, LayerNorm."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.0, n_levels: int = 3,
                 n_heads: int = 8, n_points: int = 4):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, shapes: Sequence[Tuple[int, int]],
                starts: Tensor) -> Tensor:
        attn = self.self_attn(src + pos, reference_points, src, shapes, starts)
        src = self.norm1(src + self.dropout(attn))
        ffn = self.linear2(self.dropout(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout(ffn))


def encoder_reference_points(shapes: Sequence[Tuple[int, int]], n_levels: int, device) -> Tensor:
    """Pixel centres ((j + 0.5) / W, (i + 0.5) / H) of every level, flattened and concatenated,
    repeated over the levels: Tensor[1, S, n_levels, 2] (no padding: valid ratios are 1)."""
    refs = []
    for h, w in shapes:
        ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        refs.append(torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), -1).reshape(-1, 2))
    return torch.cat(refs, 0)[None, :, None, :].expand(1, -1, n_levels, 2)


class MSDeformAttnPixelDecoder(nn.Module):
    """Args:
        in_channels: channels of the backbone levels, finest first (strides 4, 8, 16, 32).
        conv_dim: width of the encoder and FPN (256).
        mask_dim: channels of the mask features (256).
        num_layers, n_heads, n_points, d_ffn, dropout: the deformable encoder (6, 8, 4, 1024, 0).
        num_levels: backbone levels seen by the encoder, the coarsest ones (3).

    ``forward(features)`` takes the backbone levels finest first and returns
    ``(mask_features [B, mask_dim, H/4, W/4], [the encoder's outputs at strides 32, 16, 8])``.
    The whole decoder runs in float32 (autocast off), as the reference."""

    def __init__(self, in_channels: Sequence[int], conv_dim: int = 256, mask_dim: int = 256, num_layers: int = 6,
                 n_heads: int = 8, n_points: int = 4, d_ffn: int = 1024, dropout: float = 0.0,
                 num_levels: int = 3, common_stride: int = 4, strides: Sequence[int] = (4, 8, 16, 32)):
        super().__init__()
        in_channels = list(in_channels)
        if len(in_channels) != len(strides):
            raise ValueError(f"in_channels and strides must have one entry per level, got {in_channels} and {strides}")
        if not 1 <= num_levels <= len(in_channels):
            raise ValueError(f"num_levels must be in [1, {len(in_channels)}], got {num_levels}")
        self.num_levels = num_levels
        self.conv_dim = conv_dim
        # input_proj[i] projects the i-th coarsest level (res5 first).
        self.input_proj = nn.ModuleList(
            _conv_gn(c, conv_dim, 1, bias=True) for c in reversed(in_channels[-num_levels:]))
        self.level_embed = nn.Parameter(torch.empty(num_levels, conv_dim))
        self.encoder = nn.ModuleList(DeformableEncoderLayer(conv_dim, d_ffn, dropout, num_levels, n_heads, n_points)
                                     for _ in range(num_layers))
        self.mask_features = nn.Conv2d(conv_dim, mask_dim, 1)
        # FPN levels between the finest encoder level and common_stride: adapter_k / layer_k for
        # the k-th finest backbone level.
        self.num_fpn_levels = int(round(math.log2(min(strides[-num_levels:])) - math.log2(common_stride)))
        for k in range(self.num_fpn_levels):
            self.add_module(f"adapter_{k + 1}", _conv_gn(in_channels[k], conv_dim, 1, bias=False))
            self.add_module(f"layer_{k + 1}", _conv_gn(conv_dim, conv_dim, 3, bias=False, relu=True))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        nn.init.normal_(self.level_embed)
        for layer in self.encoder:
            layer.self_attn.reset_parameters()
        for k in range(self.num_fpn_levels):
            for name in (f"adapter_{k + 1}", f"layer_{k + 1}"):
                nn.init.kaiming_uniform_(getattr(self, name)[0].weight, a=1)  # c2_xavier_fill
        nn.init.kaiming_uniform_(self.mask_features.weight, a=1)
        nn.init.constant_(self.mask_features.bias, 0)

    def forward(self, features: Sequence[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        with torch.autocast(features[0].device.type, enabled=False):
            return self._forward([f.float() for f in features])

    def _forward(self, features: List[Tensor]) -> Tuple[Tensor, List[Tensor]]:
        coarse = features[::-1][: self.num_levels]  # res5, res4, res3
        srcs, poss, shapes = [], [], []
        for lvl, x in enumerate(coarse):
            h, w = int(x.shape[-2]), int(x.shape[-1])
            shapes.append((h, w))
            # [B, C, H, W] -> [B, H * W, C]: a view for channels_last inputs
            srcs.append(self.input_proj[lvl](x).permute(0, 2, 3, 1).reshape(x.shape[0], h * w, self.conv_dim))
            pos = sine_position_embedding((h, w), self.conv_dim // 2, x.device)
            poss.append(pos.flatten(1).transpose(0, 1)[None] + self.level_embed[lvl][None, None])
        src = torch.cat(srcs, 1)
        pos = torch.cat(poss, 1)
        starts_list = [0]
        for h, w in shapes[:-1]:
            starts_list.append(starts_list[-1] + h * w)
        starts = torch.tensor(starts_list, dtype=torch.int64, device=src.device)
        ref = encoder_reference_points(shapes, self.num_levels, src.device).expand(src.shape[0], -1, -1, -1)
        for layer in self.encoder:
            src = layer(src, pos, ref, shapes, starts)
        b = src.shape[0]
        # back to [B, C, H, W] as channels_last views (no copy; the FPN convolutions take them as they are)
        outs = [y.reshape(b, h, w, self.conv_dim).permute(0, 3, 1, 2)
                for y, (h, w) in zip(torch.split(src, [h * w for h, w in shapes], 1), shapes)]
        multi_scale = list(outs)
        y = outs[-1]
        for k in reversed(range(self.num_fpn_levels)):
            lateral = getattr(self, f"adapter_{k + 1}")(features[k])
            y = lateral + F.interpolate(y, size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            y = getattr(self, f"layer_{k + 1}")(y)
        return self.mask_features(y), multi_scale[: self.num_levels]

