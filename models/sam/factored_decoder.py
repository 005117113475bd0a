"""``FactoredMaskDecoder``: SAM's mask decoder for many prompts on one image without mask
inputs (the automatic mask generator's batches), with the image-side work shared across the
prompts and the per-prompt image-side work done in low rank. Same function as
``MaskDecoder`` (same weights, same outputs up to float rounding; see below).

Why it is faster. Per prompt, the two-way transformer carries an (L, C) image-side tensor
(L = h * w tokens, 4096 at the official sizes, C = 256), and most of the official cost is
linear maps of it. Here:

- layer 1: the token-to-image keys and values and the image-to-token queries are projections
  of the image embedding (plus the no-mask dense embedding and the positional encoding):
  the same for every prompt, computed once per image;
- image-to-token attention: ``out_proj(A @ V) = A @ (V Wo^T) + b`` per head, so its output is
  ``A_i U_i`` with A_i (L, heads * N) the attention weights and U_i (heads * N, C) small
  (N tokens per prompt, 7 for one point): layer i's image tensor is
  ``keys_i = LN_i(keys_{i-1} + A_i U_i + b_i)``;
- a linear map R of ``keys_d`` unrolls through the LayerNorms (per-row scale r_j = 1/std and
  shift mu_j, per-channel gamma_j, beta_j) into
  ``S_1 * (X Q_1) + [S_i A_i, S_i mu_i, S_i] @ [U_i Q_i; -1^T Q_i; (b_i + beta_{i-1}) Q_i] + const``
  with X the (shared) image embedding, ``Q_i = diag(gamma_i ... gamma_d) R`` and
  ``S_i = r_i ... r_d``: X Q_1 is computed once per image, the rest costs L x (~60 per layer)
  x width per prompt instead of L x C x width. This gives layer 2's three projections, the
  final attention's keys and values and the first transposed convolution of the output
  upscaling (a per-pixel linear map C -> 4 x C/4).
- The LayerNorm statistics (mu_i, r_i) come from the materialised ``keys_{i-1} + A_i U_i + b_i``
  (one (L, C) tensor per prompt, formed by a rank-(heads * N) update).
- The upscaling runs channels-last, and only the selected masks' hypernetworks are evaluated.

Exactness: the algebra is exact; float rounding differs from the plain decoder's (relative
differences of order 1e-6 in logits and IoU predictions), so a mask pixel whose logit lies
within that of the threshold can flip. ``SamPredictor`` keeps the plain decoder (equal to the
official to 1e-5); the mask generator uses this one unless ``exact_decoder=True``.
"""
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .mask_decoder import MaskDecoder


def _heads(x: Tensor, num_heads: int) -> Tensor:
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def _merge(x: Tensor) -> Tensor:
    b, h, n, c = x.shape
    return x.transpose(1, 2).reshape(b, n, h * c)


class FactoredMaskDecoder:
    """Decodes batches of sparse prompts against one image embedding with the no-mask dense
    embedding. ``image_embeddings`` (1, C, h, w), ``image_pe`` (1, C, h, w); ``dense`` is the
    prompt encoder's no-mask embedding (1, C, 1, 1) or (1, C, h, w). ``chunk`` prompts are
    decoded at a time (bounds the memory: about 20 MB per prompt at the official sizes)."""

    @torch.no_grad()
    def __init__(self, decoder: MaskDecoder, image_embeddings: Tensor, image_pe: Tensor, dense: Tensor,
                 chunk: int = 8) -> None:
        if image_embeddings.dim() != 4 or image_embeddings.shape[0] != 1:
            raise ValueError(f"FactoredMaskDecoder: one image embedding (1, C, h, w), got "
                             f"{tuple(image_embeddings.shape)}")
        if chunk < 1:
            raise ValueError(f"chunk must be positive, got {chunk}")
        tr = decoder.transformer
        self.decoder, self.chunk, self.depth = decoder, chunk, len(tr.layers)
        _, c, h, w = image_embeddings.shape
        length = h * w
        self.c, self.h, self.w, self.length = c, h, w, length
        src = (image_embeddings + dense).flatten(2).transpose(1, 2)[0]   # (L, C)
        pe = image_pe.expand(1, -1, h, w).flatten(2).transpose(1, 2)[0].to(src.dtype)
        first = tr.layers[0]
        t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
        # layer 1's prompt-independent projections per head: keys^T and image queries^T
        # (heads, dh, L), values (heads, L, dh)
        self.k1t = t2i.k_proj(src + pe).t().reshape(t2i.num_heads, -1, length).contiguous()
        self.v1 = t2i.v_proj(src).reshape(length, t2i.num_heads, -1).transpose(0, 1).contiguous()
        self.q1t = i2t.q_proj(src + pe).t().reshape(i2t.num_heads, -1, length).contiguous()
        self.x = src + i2t.out_proj.bias                         # X: layer 1's residual plus bias
        # out_proj weights per head: (heads, dh, C)
        self.wo = [lay.cross_attn_image_to_token.out_proj.weight.t().reshape(
            lay.cross_attn_image_to_token.num_heads, -1, c) for lay in tr.layers]
        # layer i's LayerNorm shift plus layer i+1's image-to-token output bias
        self.ln_shift = [lay.norm4.bias + nxt.cross_attn_image_to_token.out_proj.bias
                         for lay, nxt in zip(tr.layers, tr.layers[1:])] + [tr.layers[-1].norm4.bias]
        gammas = [lay.norm4.weight for lay in tr.layers]
        betas = [lay.norm4.bias for lay in tr.layers]
        up = decoder.output_upscaling
        conv1, self.up_norm, self.up_act1, conv2, self.up_act2 = up[0], up[1], up[2], up[3], up[4]
        self.c4, self.c8 = conv1.out_channels, conv2.out_channels
        # second transposed convolution as a per-pixel linear map, output order (sub-pixel, channel)
        self.w2 = conv2.weight.permute(2, 3, 1, 0).reshape(4 * self.c8, self.c4).contiguous()
        self.b2 = conv2.bias.repeat(4)
        # linear maps of keys_d, d = 1..depth: for d < depth layer d+1's token-to-image keys and
        # values and image-to-token queries, for d = depth the final attention's keys and values
        # and the first transposed convolution (output order (sub-pixel, channel)). Keys, values
        # and queries are produced transposed, (B, width, L), the convolution (B, L, width).
        self.groups = []
        for d in range(1, self.depth + 1):
            if d < self.depth:
                a, b = tr.layers[d].cross_attn_token_to_image, tr.layers[d].cross_attn_image_to_token
                maps = [(a.k_proj.weight.t(), a.k_proj.bias, True, True), (a.v_proj.weight.t(), a.v_proj.bias, False, True),
                        (b.q_proj.weight.t(), b.q_proj.bias, True, True)]
            else:
                f = tr.final_attn_token_to_image
                maps = [(f.k_proj.weight.t(), f.k_proj.bias, True, True), (f.v_proj.weight.t(), f.v_proj.bias, False, True),
                        (conv1.weight.permute(0, 2, 3, 1).reshape(c, -1), conv1.bias.repeat(4), False, False)]
            groups = []
            for r, bias, with_pe, transposed in maps:
                qs: List[Tensor] = [None] * (d + 1)
                g = torch.ones_like(gammas[0])
                for i in range(d, 0, -1):
                    g = g * gammas[i - 1]
                    qs[i] = g[:, None] * r
                const = bias + betas[d - 1] @ r                       # (width,)
                if with_pe:
                    const = pe @ r + const                            # (L, width)
                xq = self.x @ qs[1]
                if transposed:
                    xq = xq.t().contiguous()
                    const = const.t().contiguous() if const.dim() == 2 else const[:, None]
                groups.append(dict(
                    q=qs, xq=xq, const=const, transposed=transposed,
                    neg_colsum=[None] + [-qs[i].sum(0) for i in range(1, d + 1)],
                    shifts=[None, None] + [(tr.layers[i - 1].cross_attn_image_to_token.out_proj.bias + betas[i - 2])
                                           @ qs[i] for i in range(2, d + 1)]))
            self.groups.append(groups)

    @staticmethod
    def _lowrank(state, rows=None):
        """From the per-layer state: S_1 (B, L) and the transposed coefficient matrix
        [S_i A_i, S_i mu_i, S_i (i >= 2)]^T (B, K, L), optionally for a subset of the prompts."""
        if rows is not None:
            state = [tuple(t[rows] for t in st) for st in state]
        d = len(state)
        scales = [None] * (d + 1)
        scales[d] = state[d - 1][3]
        for i in range(d - 1, 0, -1):
            scales[i] = scales[i + 1] * state[i - 1][3]
        cols = []
        for i in range(1, d + 1):
            at, _, mu, _ = state[i - 1]
            s = scales[i][:, None, :]
            cols += [s * at, s * mu[:, None, :]]
            if i >= 2:
                cols.append(s)
        return scales[1], torch.cat(cols, 1), [st[1] for st in state]

    @staticmethod
    def _apply(g, s1: Tensor, acat_t: Tensor, us: List[Tensor]) -> Tensor:
        """keys_d @ R + bias (+ positional part) for one group: (B, width, L) when transposed
        else (B, L, width)."""
        b = s1.shape[0]
        rows = []
        for i in range(1, len(us) + 1):
            rows += [us[i - 1] @ g["q"][i], g["neg_colsum"][i].expand(b, 1, -1)]
            if i >= 2:
                rows.append(g["shifts"][i].expand(b, 1, -1))
        m = torch.cat(rows, 1)                                       # (B, K, width)
        if g["transposed"]:
            return torch.addcmul(g["const"], s1[:, None, :], g["xq"]).baddbmm_(m.transpose(1, 2), acat_t)
        return torch.addcmul(g["const"], s1[:, :, None], g["xq"]).baddbmm_(acat_t.transpose(1, 2), m)

    @staticmethod
    def _attend(attn, queries: Tensor, kt: Tensor, vt: Tensor) -> Tensor:
        """Token-to-image attention with per-prompt transposed keys and values (B, Ci, L)."""
        heads = attn.num_heads
        q = _heads(attn.q_proj(queries), heads)
        b, length = kt.shape[0], kt.shape[-1]
        logits = q @ kt.view(b, heads, -1, length)
        weights = torch.softmax(logits / math.sqrt(q.shape[-1]), dim=-1)
        return attn.out_proj(_merge(weights @ vt.view(b, heads, -1, length).transpose(-2, -1)))

    @staticmethod
    def _attend_shared(attn, queries: Tensor, k1t: Tensor, v1: Tensor) -> Tensor:
        """Token-to-image attention with keys and values shared by the prompts: all prompts'
        queries of one head in one matrix product."""
        heads = attn.num_heads
        q = attn.q_proj(queries)
        b, n, ci = q.shape
        qh = q.reshape(b * n, heads, ci // heads).transpose(0, 1)      # (heads, B * N, dh)
        weights = torch.softmax((qh @ k1t) / math.sqrt(ci // heads), dim=-1)
        return attn.out_proj((weights @ v1).transpose(0, 1).reshape(b, n, ci))

    @torch.no_grad()
    def __call__(self, sparse: Tensor, multimask_output: bool = True,
                 iou_threshold: Optional[float] = None) -> Tuple[Tensor, Tensor]:
        """``sparse`` (B, N, C) prompt embeddings -> mask logits (B, M, 4h, 4w) and IoU
        predictions (B, M), as ``MaskDecoder.forward`` with the no-mask dense embedding.
        With ``iou_threshold``, only the masks whose IoU prediction is above it are computed
        and returned, (K, 4h, 4w) in (prompt, mask) order: ``logits[iou > iou_threshold]``."""
        if sparse.dim() != 3 or sparse.shape[-1] != self.c:
            raise ValueError(f"sparse prompt embeddings must be (B, N, {self.c}), got {tuple(sparse.shape)}")
        dec = self.decoder
        sel = list(range(1, dec.num_mask_tokens)) if multimask_output else [0]
        size = (4 * self.h, 4 * self.w)
        masks = [self.x.new_zeros((0,) + size if iou_threshold is not None else (0, len(sel)) + size)]
        ious = [self.x.new_zeros(0, len(sel))]
        for s in range(0, sparse.shape[0], self.chunk):
            m, i = self._decode(sparse[s:s + self.chunk], sel, iou_threshold)
            masks.append(m)
            ious.append(i)
        return torch.cat(masks), torch.cat(ious)

    def _decode(self, sparse: Tensor, sel: List[int], iou_threshold: Optional[float]) -> Tuple[Tensor, Tensor]:
        dec, tr = self.decoder, self.decoder.transformer
        b, c, length = sparse.shape[0], self.c, self.length
        out_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], 0)
        tokens = torch.cat([out_tokens.expand(b, -1, -1), sparse.to(out_tokens.dtype)], 1)
        n = tokens.shape[1]
        queries = tokens
        state = []   # per layer: A_i^T (B, heads * N, L), U_i (B, heads * N, C), mu_i, r_i (B, L)
        keys = None
        for d, layer in enumerate(tr.layers):
            if layer.skip_first_layer_pe:
                queries = layer.self_attn(queries, queries, queries)
            else:
                q = queries + tokens
                queries = queries + layer.self_attn(q, q, queries)
            queries = layer.norm1(queries)
            t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
            if d == 0:
                attended = self._attend_shared(t2i, queries + tokens, self.k1t, self.v1)
            else:
                lowrank = self._lowrank(state)
                kt, vt, qt = (self._apply(g, *lowrank) for g in self.groups[d - 1])
                del lowrank
                attended = self._attend(t2i, queries + tokens, kt, vt)
                del kt, vt
            queries = layer.norm2(queries + attended)
            queries = layer.norm3(queries + layer.mlp(queries))
            # image-to-token attention (softmax over the N tokens), transposed: (B, heads, N, L);
            # out_proj folded into the values
            heads = i2t.num_heads
            kq = _heads(i2t.k_proj(queries + tokens), heads)
            vq = _heads(i2t.v_proj(queries), heads)
            if d == 0:
                logits = (kq.transpose(0, 1).reshape(heads, b * n, -1) @ self.q1t).view(heads, b, n, length)
                logits = logits.transpose(0, 1)
            else:
                logits = kq @ qt.view(b, heads, -1, length)
                del qt
            weights = torch.softmax(logits / math.sqrt(kq.shape[-1]), dim=2)
            at = weights.reshape(b, heads * n, length)
            u = (vq @ self.wo[d]).reshape(b, heads * n, c)
            # pre_i = keys_{i-1} + A_i U_i + b_i (layer 1: X already holds b_1; later layers:
            # b_i was added to keys_{i-1} through its LayerNorm's shift, keys_{i-1} is needed
            # only here)
            if d == 0:
                pre = torch.baddbmm(self.x, at.transpose(1, 2), u)
            else:
                pre = keys.baddbmm_(at.transpose(1, 2), u)
            keys, mu, rstd = torch.native_layer_norm(pre, (c,), layer.norm4.weight, self.ln_shift[d],
                                                     layer.norm4.eps)
            del pre
            state.append((at, u, mu[..., 0], rstd[..., 0]))
        del keys
        f = tr.final_attn_token_to_image
        final = self.groups[-1]
        lowrank = self._lowrank(state)
        kt, vt = self._apply(final[0], *lowrank), self._apply(final[1], *lowrank)
        queries = tr.norm_final_attn(queries + self._attend(f, queries + tokens, kt, vt))
        del kt, vt, lowrank
        iou = dec.iou_prediction_head(queries[:, 0])[:, sel]
        rows = None
        if iou_threshold is not None:
            keep = iou > iou_threshold
            rows = keep.any(1).nonzero()[:, 0]
            if rows.numel() == 0:
                return iou.new_zeros((0, 4 * self.h, 4 * self.w)), iou
            queries = queries[rows]
        # output upscaling, channels last: (B, L, 4 * C/4) -> LN, act -> (B, 4 L, 4 * C/8) -> act
        up = self._apply(final[2], *self._lowrank(state, rows))
        del state
        bk = up.shape[0]
        up = up.view(bk, length * 4, self.c4)
        up = self.up_act1(F.layer_norm(up, (self.c4,), self.up_norm.weight, self.up_norm.bias, self.up_norm.eps))
        up = self.up_act2(F.linear(up, self.w2, self.b2))
        hyper = torch.stack([dec.output_hypernetworks_mlps[i](queries[:, 1 + i]) for i in sel], 1)  # (B, M, C/8)
        masks = up.view(bk, length * 16, self.c8) @ hyper.transpose(1, 2)                         # (B, 16 L, M)
        del up
        h, w = self.h, self.w
        masks = masks.view(bk, h, w, 2, 2, 2, 2, len(sel)).permute(0, 7, 1, 3, 5, 2, 4, 6)
        masks = masks.reshape(bk, len(sel), 4 * h, 4 * w)
        if iou_threshold is not None:
            masks = masks[keep[rows]]
        return masks, iou
