"""SAM's ViT image encoder (``ImageEncoderViT``): patch embedding, absolute position
embedding, transformer blocks with windowed or global attention and decomposed relative
positions, and a convolutional neck to ``out_chans`` channels. Parameter names are the
official ones, so an official checkpoint loads as it is."""
from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .common import LayerNorm2d, MLPBlock


def window_partition(x: Tensor, window: int) -> Tuple[Tensor, Tuple[int, int]]:
    """(B, H, W, C) -> (B * nWindows, window, window, C), padding H and W at the end to
    multiples of ``window``; also returns the padded size."""
    b, h, w, c = x.shape
    pad_h, pad_w = (-h) % window, (-w) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    hp, wp = h + pad_h, w + pad_w
    x = x.view(b, hp // window, window, wp // window, window, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, window, window, c), (hp, wp)


def window_unpartition(windows: Tensor, window: int, padded: Tuple[int, int],
                       size: Tuple[int, int]) -> Tensor:
    """Inverse of ``window_partition``, dropping the padding."""
    hp, wp = padded
    h, w = size
    b = windows.shape[0] // ((hp // window) * (wp // window))
    x = windows.view(b, hp // window, wp // window, window, window, -1).permute(0, 1, 3, 2, 4, 5)
    x = x.reshape(b, hp, wp, -1)
    return x[:, :h, :w, :].contiguous() if (hp, wp) != (h, w) else x


def relative_position_table(q_size: int, k_size: int, rel_pos: Tensor) -> Tensor:
    """The (q_size, k_size, C) table of relative position embeddings, ``rel_pos`` (L, C)
    resized linearly when L is not 2 * max(q_size, k_size) - 1."""
    length = 2 * max(q_size, k_size) - 1
    if rel_pos.shape[0] != length:
        rel_pos = F.interpolate(rel_pos.t()[None], size=length, mode="linear")[0].t()
    q_scale = max(k_size / q_size, 1.0)
    k_scale = max(q_size / k_size, 1.0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * q_scale
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * k_scale
    index = (q_coords - k_coords) + (k_size - 1) * k_scale
    return rel_pos[index.long()]


def add_relative_position_bias(attn: Tensor, q: Tensor, rel_pos_h: Tensor, rel_pos_w: Tensor,
                               q_hw: Tuple[int, int], k_hw: Tuple[int, int]) -> Tensor:
    """Decomposed relative positions (MViTv2): adds to the attention logits ``attn``
    (B, qh * qw, kh * kw), in place, the terms of queries ``q`` (B, qh * qw, C) with the row
    and column tables (in the official order of operations, so that results are bitwise the
    same; in place, no two temporaries of the logits' size)."""
    qh, qw = q_hw
    kh, kw = k_hw
    table_h = relative_position_table(qh, kh, rel_pos_h)
    table_w = relative_position_table(qw, kw, rel_pos_w)
    b, _, c = q.shape
    rq = q.reshape(b, qh, qw, c)
    bias_h = torch.einsum("bhwc,hkc->bhwk", rq, table_h)
    bias_w = torch.einsum("bhwc,wkc->bhwk", rq, table_w)
    grid = attn.view(b, qh, qw, kh, kw)
    grid.add_(bias_h[:, :, :, :, None]).add_(bias_w[:, :, :, None, :])
    return attn


class Attention(nn.Module):
    """Multi-head self-attention over a (B, H, W, C) grid with optional relative positions."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, use_rel_pos: bool = False,
                 rel_pos_zero_init: bool = True, input_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        if use_rel_pos:
            if input_size is None:
                raise ValueError("relative positions need the input size")
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * input_size[0] - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * input_size[1] - 1, head_dim))
            if not rel_pos_zero_init:
                nn.init.trunc_normal_(self.rel_pos_h, std=0.02)
                nn.init.trunc_normal_(self.rel_pos_w, std=0.02)

    # (B * heads) rows attended at a time: bounds the memory of the logits of global attention.
    # The logits are computed as the official's (not fused), so that outputs are the same bits.
    chunk_elements = 1 << 26

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, _ = x.shape
        n = h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, n, -1).unbind(0)
        rows = max(1, self.chunk_elements // (n * n))
        outs = []
        for s in range(0, q.shape[0], rows):
            qs, ks, vs = q[s:s + rows], k[s:s + rows], v[s:s + rows]
            attn = (qs * self.scale) @ ks.transpose(-2, -1)
            if self.use_rel_pos:
                attn = add_relative_position_bias(attn, qs, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
            outs.append(attn.softmax(dim=-1) @ vs)
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        out = out.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(out)


class Block(nn.Module):
    """Pre-norm transformer block; ``window_size`` > 0 attends within windows."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 norm_layer: Type[nn.Module] = nn.LayerNorm, act_layer: Type[nn.Module] = nn.GELU,
                 use_rel_pos: bool = False, rel_pos_zero_init: bool = True, window_size: int = 0,
                 input_size: Optional[Tuple[int, int]] = None):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, rel_pos_zero_init,
                              input_size if window_size == 0 else (window_size, window_size))
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), act_layer)
        self.window_size = window_size

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            size = (x.shape[1], x.shape[2])
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: (B, C, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, kernel_size=(16, 16), stride=(16, 16), padding=(0, 0), in_chans: int = 3,
                 embed_dim: int = 768):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size, stride, padding)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ImageEncoderViT(nn.Module):
    """SAM's image encoder: (B, 3, img_size, img_size) -> (B, out_chans, img_size / patch,
    img_size / patch). ``global_attn_indexes`` name the blocks with global attention; the
    others attend within ``window_size`` windows."""

    def __init__(self, img_size: int = 1024, patch_size: int = 16, in_chans: int = 3,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 out_chans: int = 256, qkv_bias: bool = True,
                 norm_layer: Type[nn.Module] = None, act_layer: Type[nn.Module] = nn.GELU,
                 use_abs_pos: bool = True, use_rel_pos: bool = False, rel_pos_zero_init: bool = True,
                 window_size: int = 0, global_attn_indexes: Sequence[int] = ()):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if norm_layer is None:
            def norm_layer(d):
                return nn.LayerNorm(d, eps=1e-6)
        self.img_size = img_size
        grid = img_size // patch_size
        self.patch_embed = PatchEmbed((patch_size, patch_size), (patch_size, patch_size), (0, 0),
                                      in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, grid, grid, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, norm_layer, act_layer, use_rel_pos,
                  rel_pos_zero_init, 0 if i in global_attn_indexes else window_size, (grid, grid))
            for i in range(depth))
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dim, out_chans, 1, bias=False), LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False), LayerNorm2d(out_chans))

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.neck(x.permute(0, 3, 1, 2))
