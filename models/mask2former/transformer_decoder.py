"""Mask2Former's masked-attention transformer decoder (``MultiScaleMaskedTransformerDecoder``).

Every layer attends to one level of the pixel decoder (1/32, 1/16, 1/8 round-robin): masked
cross-attention first (each query sees only the pixels its previous mask prediction covers;
a query whose mask covers nothing sees everything), then self-attention, then the FFN, each
post-norm. The shared heads (LayerNorm, class Linear, 3-layer mask MLP dotted with the mask
features) predict after the learnable queries and after every layer.
"""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .pixel_decoder import sine_position_embedding


class PackedAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameters (packed
    ``in_proj_weight``/``in_proj_bias``, ``out_proj``), batch first, on
    ``F.scaled_dot_product_attention``. ``allowed``: bool Tensor[B, Lq, Lk] (True = may
    attend), shared by the heads."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model, self.n_heads, self.dropout = d_model, n_heads, dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = nn.Linear(d_model, d_model)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, allowed: Optional[Tensor] = None) -> Tensor:
        b, lq, d = query.shape
        lk = key.shape[1]
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        h, dh = self.n_heads, d // self.n_heads
        q = F.linear(query, wq, bq).view(b, lq, h, dh).transpose(1, 2)
        k = F.linear(key, wk, bk).view(b, lk, h, dh).transpose(1, 2)
        v = F.linear(value, wv, bv).view(b, lk, h, dh).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if allowed is None else allowed[:, None],
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class MaskedAttentionLayer(nn.Module):
    """Masked cross-attention, self-attention, FFN; each followed by add and LayerNorm."""

    def __init__(self, d_model: int = 256, n_heads: int = 8, dim_feedforward: int = 2048, dropout: float = 0.0):
        super().__init__()
        self.cross_attn = PackedAttention(d_model, n_heads, dropout)
        self.cross_norm = nn.LayerNorm(d_model)
        self.self_attn = PackedAttention(d_model, n_heads, dropout)
        self.self_norm = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.ffn_norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, x: Tensor, query_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                allowed: Optional[Tensor]) -> Tensor:
        x = self.cross_norm(x + self.dropout(self.cross_attn(x + query_pos, memory + memory_pos, memory, allowed)))
        q = x + query_pos
        x = self.self_norm(x + self.dropout(self.self_attn(q, q, x)))
        return self.ffn_norm(x + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(x))))))


class MLP(nn.Module):
    """Linear layers with ReLU between them (``layers.{i}``, as the reference)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def attention_mask_from_logits(mask_logits: Tensor, size: Tuple[int, int]) -> Tensor:
    """Where each query may attend at a level of ``size``: the previous prediction's mask
    logits resized bilinearly to it, sigmoid >= 0.5 (the reference's ``sigmoid < 0.5`` blocks);
    a query blocked everywhere is allowed everywhere. Detached bool Tensor[B, Q, h * w]."""
    m = F.interpolate(mask_logits.detach(), size=size, mode="bilinear", align_corners=False)
    blocked = m.sigmoid().flatten(2) < 0.5
    return ~(blocked & ~blocked.all(-1, keepdim=True))


class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Args:
        num_classes: K (the class head has K + 1 outputs; the last is no-object).
        in_channels: channels of the pixel decoder's levels (a 1x1 projection when they
            differ from hidden_dim).
        hidden_dim, num_queries, n_heads, dim_feedforward, num_layers, mask_dim, dropout:
            256, 100, 8, 2048, 9, 256, 0.0 as the reference.
        num_levels: levels of the pixel decoder used round-robin (3).

    ``forward(multi_scale, mask_features)``: ``multi_scale`` coarsest first; returns the lists
    of class logits [B, Q, K + 1] and mask logits [B, Q, H/4, W/4], one entry per prediction
    (num_layers + 1, the last is the final output)."""

    def __init__(self, num_classes: int, in_channels: int = 256, hidden_dim: int = 256, num_queries: int = 100,
                 n_heads: int = 8, dim_feedforward: int = 2048, num_layers: int = 9, mask_dim: int = 256,
                 dropout: float = 0.0, num_levels: int = 3):
        super().__init__()
        self.num_levels, self.hidden_dim, self.num_classes = num_levels, hidden_dim, num_classes
        self.query_feat = nn.Embedding(num_queries, hidden_dim)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.level_embed = nn.Embedding(num_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(num_levels):
            if in_channels != hidden_dim:
                conv = nn.Conv2d(in_channels, hidden_dim, 1)
                nn.init.kaiming_uniform_(conv.weight, a=1)
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Identity())
        self.layers = nn.ModuleList(MaskedAttentionLayer(hidden_dim, n_heads, dim_feedforward, dropout)
                                    for _ in range(num_layers))
        self.decoder_norm = nn.LayerNorm(hidden_dim)
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    def heads(self, x: Tensor, mask_features: Tensor) -> Tuple[Tensor, Tensor]:
        """The shared prediction heads: (class logits, mask logits) of queries ``x`` [B, Q, C]."""
        x = self.decoder_norm(x)
        return self.class_embed(x), torch.einsum("bqc,bchw->bqhw", self.mask_embed(x), mask_features)

    def forward(self, multi_scale: Sequence[Tensor], mask_features: Tensor) -> Tuple[List[Tensor], List[Tensor]]:
        if len(multi_scale) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} feature levels, got {len(multi_scale)}")
        memories, poss, sizes = [], [], []
        for i, feat in enumerate(multi_scale):
            h, w = int(feat.shape[-2]), int(feat.shape[-1])
            sizes.append((h, w))
            pos = sine_position_embedding((h, w), self.hidden_dim // 2, feat.device, feat.dtype)
            poss.append(pos.flatten(1).transpose(0, 1)[None])
            mem = self.input_proj[i](feat).flatten(2) + self.level_embed.weight[i][None, :, None]
            memories.append(mem.transpose(1, 2))
        b = mask_features.shape[0]
        x = self.query_feat.weight[None].expand(b, -1, -1)
        query_pos = self.query_embed.weight[None].expand(b, -1, -1)
        cls, masks = self.heads(x, mask_features)
        all_cls, all_masks = [cls], [masks]
        for i, layer in enumerate(self.layers):
            lvl = i % self.num_levels
            allowed = attention_mask_from_logits(masks, sizes[lvl])
            x = layer(x, query_pos, memories[lvl], poss[lvl], allowed)
            cls, masks = self.heads(x, mask_features)
            all_cls.append(cls)
            all_masks.append(masks)
        return all_cls, all_masks
