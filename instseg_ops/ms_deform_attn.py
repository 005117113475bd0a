"""Multi-scale deformable attention: Python API, fake kernels and autograd for
``instseg::ms_deform_attn``, and the ``MSDeformAttn`` module.

The op has the semantics of Deformable DETR's ``MSDeformAttnFunction`` (also
used by Mask2Former and the DINO family) and of transformers'
``multi_scale_deformable_attention`` (grid_sample), but runs on the CPU and on
CUDA in float32/float64/float16/bfloat16, takes any batch size (no
``im2col_step``), raises clear errors instead of reading out of bounds, has a
deterministic CUDA backward and traces under ``torch.compile`` and
``torch.export``.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ShapesArg = Union[Tensor, Sequence[Tuple[int, int]]]


def _level_tables(spatial_shapes: ShapesArg, level_start_index: Optional[Tensor], device) -> Tuple[Tensor, Tensor]:
    """int64 (spatial_shapes Tensor[L, 2], level_start_index Tensor[L]) from either tensors or (H, W) pairs."""
    if not isinstance(spatial_shapes, Tensor):
        pairs = [tuple(hw) for hw in spatial_shapes]
        for i, hw in enumerate(pairs):
            if len(hw) != 2:
                raise ValueError(f"ms_deform_attn: spatial_shapes[{i}] must be an (H, W) pair, got {hw!r}")
        spatial_shapes = torch.tensor([[int(h), int(w)] for h, w in pairs], dtype=torch.int64,
                                      device=device).reshape(-1, 2)
        if level_start_index is None:
            starts, acc = [], 0
            for h, w in pairs:
                starts.append(acc)
                acc += int(h) * int(w)
            level_start_index = torch.tensor(starts, dtype=torch.int64, device=device)
    elif level_start_index is None:
        areas = spatial_shapes[:, 0] * spatial_shapes[:, 1]
        level_start_index = torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])
    return spatial_shapes, level_start_index


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: ShapesArg,
    level_start_index: Optional[Tensor],
    sampling_locations: Tensor,
    attention_weights: Tensor,
    *,
    deterministic: Optional[bool] = None,
) -> Tensor:
    """Multi-scale deformable attention (Zhu et al., Deformable DETR).

    For every query q and head m, the output is
    ``sum_{l, p} attention_weights[n, q, m, l, p] * bilinear(value of level l, head m, at
    sampling_locations[n, q, m, l, p])``: bilinear sampling in the ``align_corners=False``
    convention with zeros off the level (``grid_sample(bilinear, zeros)``), as the reference op.

    Args:
        value: Tensor[N, S, M, D] (batch, flattened pixels of all levels, heads, channels per
            head), float32/float64/float16/bfloat16.
        spatial_shapes: int64 Tensor[L, 2] of (H, W) per level, on value's device, or a
            sequence of (H, W) pairs (constants for ``torch.export``). The levels tile the S
            rows of value in order: sum of H * W must be S.
        level_start_index: int64 Tensor[L], the first row of each level (``[0, cumsum(H * W)[:-1]]``);
            ``None`` computes it. A table inconsistent with spatial_shapes is an error.
        sampling_locations: Tensor[N, Lq, M, L, P, 2], normalised (x, y): (0, 0) is the
            top-left corner of the level, (1, 1) the bottom-right. Any floating dtype; used
            in float32 (float64 for float64 values). NaN/inf locations and locations off the
            level contribute zero and receive zero gradient.
        attention_weights: Tensor[N, Lq, M, L, P], any floating dtype (used as the locations).
            The op does not normalise them (the modules softmax over L * P).
        deterministic: use the deterministic CUDA backward (no floating-point atomics). ``None``
            follows ``torch.are_deterministic_algorithms_enabled()``. CPU is always deterministic.

    Returns:
        Tensor[N, Lq, M * D] in value's dtype (half/bfloat16 accumulate in float32).
        Differentiable with respect to value, sampling_locations and attention_weights; the
        gradients have the dtypes of their inputs. Double backward is computed with the
        grid_sample formulation (slow, but exact).
    """
    shapes, starts = _level_tables(spatial_shapes, level_start_index, value.device)
    det = torch.are_deterministic_algorithms_enabled() if deterministic is None else bool(deterministic)
    return torch.ops.instseg.ms_deform_attn(value, shapes, starts, sampling_locations, attention_weights, det)


# ---------------------------------------------------------------------------
# Fake kernels: shapes and dtypes, no data.


def _check_meta(op, value, spatial_shapes, level_start_index, loc, attn):
    torch._check(value.dim() == 4, lambda: f"{op}: value must be a 4-D tensor [N, S, M, D]")
    torch._check(spatial_shapes.dim() == 2 and spatial_shapes.shape[1] == 2,
                 lambda: f"{op}: spatial_shapes must be a Tensor[L, 2] of (H, W)")
    torch._check(level_start_index.dim() == 1 and level_start_index.shape[0] == spatial_shapes.shape[0],
                 lambda: f"{op}: level_start_index must be a Tensor[L]")
    torch._check(loc.dim() == 6, lambda: f"{op}: sampling_locations must be a 6-D tensor [N, Lq, M, L, P, 2]")
    torch._check(attn.dim() == 5, lambda: f"{op}: attention_weights must be a 5-D tensor [N, Lq, M, L, P]")
    n, _, m, _ = value.shape
    torch._check(loc.shape[0] == n and loc.shape[2] == m and loc.shape[3] == spatial_shapes.shape[0]
                 and loc.shape[5] == 2, lambda: f"{op}: sampling_locations must have shape [N, Lq, M, L, P, 2]")
    torch._check(tuple(attn.shape) == tuple(loc.shape[:5]),
                 lambda: f"{op}: attention_weights must have shape [N, Lq, M, L, P]")
    for t in (value, loc, attn):
        torch._check(t.dtype.is_floating_point, lambda: f"{op}: value, sampling_locations and attention_weights "
                     "must be floating tensors")
    for t in (spatial_shapes, level_start_index):
        torch._check(t.dtype == torch.int64, lambda: f"{op}: spatial_shapes and level_start_index must be int64")
    for name, t in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index),
                    ("sampling_locations", loc), ("attention_weights", attn)):
        torch._check(t.device == value.device, lambda: f"{op}: value is on {value.device} but {name} is on {t.device}")


@torch.library.register_fake("instseg::ms_deform_attn")
def _ms_deform_attn_fake(value, spatial_shapes, level_start_index, sampling_locations, attention_weights,
                         deterministic=False):
    _check_meta("ms_deform_attn", value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    n, _, m, d = value.shape
    return value.new_empty((n, sampling_locations.shape[1], m * d))


@torch.library.register_fake("instseg::_ms_deform_attn_backward")
def _ms_deform_attn_backward_fake(grad_output, value, spatial_shapes, level_start_index, sampling_locations,
                                  attention_weights, deterministic):
    _check_meta("_ms_deform_attn_backward", value, spatial_shapes, level_start_index, sampling_locations,
                attention_weights)
    return (torch.empty(value.shape, dtype=value.dtype, device=value.device),
            torch.empty(sampling_locations.shape, dtype=sampling_locations.dtype, device=value.device),
            torch.empty(attention_weights.shape, dtype=attention_weights.dtype, device=value.device))


# ---------------------------------------------------------------------------
# Autograd. The backward is its own op; its derivative (double backward) is
# computed from the grid_sample formulation (instseg_ops.reference), which
# has the same second derivatives (piecewise bilinear in the locations).


def _setup_context(ctx, inputs, output):
    value, shapes, starts, loc, attn, deterministic = inputs
    ctx.save_for_backward(value, shapes, starts, loc, attn)
    ctx.deterministic = deterministic


def _backward(ctx, grad):
    value, shapes, starts, loc, attn = ctx.saved_tensors
    grad_value, grad_loc, grad_attn = torch.ops.instseg._ms_deform_attn_backward(
        grad.to(value.dtype), value, shapes, starts, loc, attn, ctx.deterministic)
    return grad_value, None, None, grad_loc, grad_attn, None


torch.library.register_autograd("instseg::ms_deform_attn", _backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    grad_output, value, shapes, starts, loc, attn, _deterministic = inputs
    ctx.save_for_backward(grad_output, value, shapes, starts, loc, attn)


def _backward_backward(ctx, gg_value, gg_loc, gg_attn):
    from .reference import ms_deform_attn_reference

    grad_output, value, shapes, starts, loc, attn = ctx.saved_tensors
    work = torch.float64 if value.dtype == torch.float64 else torch.float32
    with torch.enable_grad():
        go, v, lo, a = (t.detach().to(work).requires_grad_() for t in (grad_output, value, loc, attn))
        out = ms_deform_attn_reference(v, shapes, lo, a)
        firsts = torch.autograd.grad(out, (v, lo, a), go, create_graph=True)
        pairs = [(f, g.to(work)) for f, g in zip(firsts, (gg_value, gg_loc, gg_attn)) if g is not None]
        if not pairs:
            return (None,) * 7
        seconds = torch.autograd.grad([f for f, _ in pairs], (go, v, lo, a), [g for _, g in pairs],
                                      allow_unused=True)
    like = (grad_output, value, loc, attn)
    g_go, g_v, g_lo, g_a = (None if s is None else s.to(t.dtype) for s, t in zip(seconds, like))
    return g_go, g_v, None, None, g_lo, g_a, None


torch.library.register_autograd("instseg::_ms_deform_attn_backward", _backward_backward,
                                setup_context=_backward_setup_context)


# ---------------------------------------------------------------------------
# Module


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer (Deformable DETR's ``MSDeformAttn``).

    Parameter names (``sampling_offsets``, ``attention_weights``, ``value_proj``,
    ``output_proj``) and initialisation are those of the reference and of transformers'
    ``DeformableDetrMultiscaleDeformableAttention``, so their state dicts load as they are.

    Args:
        d_model: hidden size; must be divisible by ``n_heads``.
        n_levels: number of feature levels.
        n_heads: attention heads.
        n_points: sampling points per head and level.
        deterministic: passed to :func:`ms_deform_attn`.
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 deterministic: Optional[bool] = None):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.deterministic = deterministic
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation: each head's offsets start on a ray at angle 2 pi m / M,
        scaled so that the larger coordinate is 1, point p at (p + 1) times that; uniform
        attention; xavier-uniform projections with zero biases."""
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: ShapesArg, input_level_start_index: Optional[Tensor] = None,
                input_padding_mask: Optional[Tensor] = None) -> Tensor:
        """
        Args:
            query: Tensor[N, Lq, d_model].
            reference_points: Tensor[N, Lq, n_levels, 2] of normalised (x, y), or
                Tensor[N, Lq, n_levels, 4] of normalised boxes (cx, cy, w, h): the points are
                then offset by ``offset / n_points * (w, h) / 2``.
            input_flatten: Tensor[N, S, d_model], the levels' pixels flattened and concatenated.
            input_spatial_shapes: (H, W) per level (int64 Tensor[n_levels, 2] or pairs).
            input_level_start_index: first row of each level in input_flatten, or None.
            input_padding_mask: bool Tensor[N, S], True at padding (those values are zeroed).

        Returns:
            Tensor[N, Lq, d_model].
        """
        n, lq, _ = query.shape
        _, s, _ = input_flatten.shape
        shapes, starts = _level_tables(input_spatial_shapes, input_level_start_index, query.device)
        if shapes.shape[0] != self.n_levels:
            raise ValueError(f"MSDeformAttn: expected {self.n_levels} levels, got {shapes.shape[0]}")
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(n, s, self.n_heads, self.d_model // self.n_heads)
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        if reference_points.shape[-1] == 2:
            normalizer = torch.stack([shapes[..., 1], shapes[..., 0]], -1).to(offsets.dtype)
            locations = reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif reference_points.shape[-1] == 4:
            locations = (reference_points[:, :, None, :, None, :2]
                         + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5)
        else:
            raise ValueError(f"MSDeformAttn: the last dim of reference_points must be 2 or 4, "
                             f"got {reference_points.shape[-1]}")
        out = ms_deform_attn(value, shapes, starts, locations, weights, deterministic=self.deterministic)
        return self.output_proj(out)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, n_points={self.n_points}"
