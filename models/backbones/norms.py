"""Normalisation layers for the backbones and heads: frozen BatchNorm (pretrained weights),
GroupNorm with 32 groups (training from scratch), and ``norm_layer(kind)`` to choose one."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm with fixed statistics and affine parameters (buffers, never trained)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints of trainable BatchNorm carry a step counter we do not keep.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == self.weight.dtype:
            # One fused pass (inference-mode batch_norm with these statistics): the same
            # function as the scale/shift below, about half the memory traffic.
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        # Reduced precision input (autocast): fold the statistics in float32, apply in x's dtype.
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1).to(x.dtype) + shift.reshape(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class _GroupNormChannelsLast(torch.autograd.Function):
    """GroupNorm on a channels_last CPU tensor: torch's forward, a faster backward.

    torch's CPU ``native_group_norm_backward`` is several times slower on channels_last input
    than on the standard layout (timings in benchmarks/RESULTS.md). This backward works on the
    [N, H*W, C] view of the same memory: per (image, channel) sums of
    dy and dy * x (reductions over the outer dimension, vectorised along C), the per-group
    coefficients from them, then dx = a * dy + b * x + c (two addcmul passes).
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
        n, c, h, w = x.shape
        y, mean, rstd = torch.native_group_norm(x, weight, bias, n, c, h * w, groups, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c, h, w = x.shape
        g = ctx.groups
        d = c // g
        hw = h * w
        # [N, H*W, C] views of channels_last memory (reshape copies only if dy arrives in
        # another layout).
        dyv = dy.permute(0, 2, 3, 1).reshape(n, hw, c)
        xv = x.permute(0, 2, 3, 1).reshape(n, hw, c)
        ds = (dyv * xv).sum(1)  # [N, C]: sum over pixels of dy * x
        db = dyv.sum(1)  # [N, C]: sum over pixels of dy
        mean_c = mean.repeat_interleave(d, 1)
        rstd_c = rstd.repeat_interleave(d, 1)
        grad_weight = ((ds - mean_c * db) * rstd_c).sum(0)
        grad_bias = db.sum(0)
        # Per (image, group): dx = rstd * weight * dy + c2 * x + c3.
        sds = (ds * weight).view(n, g, d).sum(2)
        sdb = (db * weight).view(n, g, d).sum(2)
        scale = 1.0 / (hw * d)
        c2 = (sdb * mean - sds) * rstd.pow(3) * scale
        c3 = -c2 * mean - sdb * rstd * scale
        dx = torch.addcmul(c3.repeat_interleave(d, 1).unsqueeze(1), xv, c2.repeat_interleave(d, 1).unsqueeze(1))
        dx.addcmul_(dyv, (rstd_c * weight).unsqueeze(1))
        return dx.view(n, h, w, c).permute(0, 3, 1, 2), grad_weight, grad_bias, None, None


# Below this many pixels per channel torch's own backward is as fast.
_GN_CL_MIN_PIXELS = 1024


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with 32 groups (fewer when the channels do not divide).

    On channels_last float CPU tensors that need gradients (training on the CPU), the
    backward pass is ``_GroupNormChannelsLast``'s, several times faster than torch's; the
    forward result is torch's either way.
    """

    def __init__(self, num_channels: int):
        groups = 32
        while num_channels % groups:
            groups //= 2
        super().__init__(groups, num_channels)

    def forward(self, x: Tensor) -> Tensor:
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        if (channels_last and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
                and x.shape[2] * x.shape[3] >= _GN_CL_MIN_PIXELS and self.affine
                and torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
                and not torch.compiler.is_compiling()):
            return _GroupNormChannelsLast.apply(x, self.weight, self.bias, self.num_groups, self.eps)
        out = super().forward(x)
        if channels_last:
            # The CPU kernel keeps channels_last but torch's fake (meta) group_norm returns the
            # standard layout, so a compiled graph would assume the wrong strides downstream.
            # Stating the layout keeps traced and eager strides equal (a no-op when eager).
            out = out.contiguous(memory_format=torch.channels_last)
        return out


NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d, "gn": GroupNorm32}


def norm_layer(kind: str):
    if kind not in NORMS:
        raise ValueError(f"norm must be one of {sorted(NORMS)}, got {kind!r}")
    return NORMS[kind]
