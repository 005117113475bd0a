"""ResNet bodies and the feature pyramid (FPN) on top of them.

Module and parameter names follow torchvision's detection backbones, so their state
dicts load with ``strict=True``: ``body.conv1``, ``body.bn1``, ``body.layer1.0.conv1``, ...,
``fpn.inner_blocks.i.0``, ``fpn.layer_blocks.i.0``.
"""
from collections import OrderedDict
from typing import Dict, List, Optional

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

    torch's CPU ``native_group_norm_backward`` is 4-10x slower on channels_last input than
    on the standard layout (21 ms against 2 ms for a [4, 32, 128, 128] float32 tensor on the
    2-core VM), and it was ~10% of a training iteration of the small CPU preset. This
    backward works on the [N, H*W, C] view of the same memory: per (image, channel) sums of
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


# Below this many pixels per channel torch's own backward is as fast (measured on the 2-core VM).
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


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, norm, downsample: Optional[nn.Module]):
        super().__init__()
        self.conv1 = conv3x3(cin, width, stride)
        self.bn1 = norm(width)
        self.conv2 = conv3x3(width, width)
        self.bn2 = norm(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (stride here, as in torchvision's ResNet v1.5), 1x1 expand."""
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, norm, downsample: Optional[nn.Module]):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = norm(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = norm(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = norm(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


DEPTHS = {18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]),
          50: (Bottleneck, [3, 4, 6, 3]), 101: (Bottleneck, [3, 4, 23, 3])}


class ResNetBody(nn.Module):
    """ResNet stem and stages; returns the outputs of layer1..layer4 (strides 4..32)."""

    def __init__(self, depth: int = 50, norm: str = "frozen_bn", trainable_layers: int = 3, width: int = 64):
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"depth must be one of {sorted(DEPTHS)}, got {depth}")
        if not 0 <= trainable_layers <= 5:
            raise ValueError(f"trainable_layers must be in [0, 5], got {trainable_layers}")
        block, counts = DEPTHS[depth]
        nl = norm_layer(norm)
        self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nl(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = width
        self.out_channels: List[int] = []
        for i, n in enumerate(counts):
            stage_width = width * 2 ** i
            stride = 1 if i == 0 else 2
            blocks = []
            for j in range(n):
                down = None
                if j == 0 and (stride != 1 or cin != stage_width * block.expansion):
                    down = nn.Sequential(nn.Conv2d(cin, stage_width * block.expansion, 1, stride=stride, bias=False),
                                         nl(stage_width * block.expansion))
                blocks.append(block(cin, stage_width, stride if j == 0 else 1, nl, down))
                cin = stage_width * block.expansion
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            self.out_channels.append(cin)
        self._initialize(norm)
        # Freeze the stem and the first stages (as torchvision's trainable_backbone_layers).
        trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
        if trainable_layers == 5:
            trainable.append("bn1")
        for name, p in self.named_parameters():
            if not any(name.startswith(t) for t in trainable):
                p.requires_grad_(False)

    def _initialize(self, norm: str):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if norm != "frozen_bn":  # zero-init the last norm of each residual branch: trains from scratch better
            for m in self.modules():
                last = getattr(m, "bn3", None) if isinstance(m, Bottleneck) else (
                    getattr(m, "bn2", None) if isinstance(m, BasicBlock) else None)
                if last is not None and getattr(last, "weight", None) is not None:
                    nn.init.zeros_(last.weight)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = OrderedDict()
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            out[str(i)] = x
        return out


class FeaturePyramid(nn.Module):
    """FPN (Lin et al. 2017): lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs,
    plus an extra level "pool" (stride-2 max pool of the coarsest output, as P6 for the RPN)."""

    def __init__(self, in_channels: List[int], out_channels: int = 256, norm: Optional[str] = None):
        super().__init__()
        self.inner_blocks = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for c in in_channels:
            inner = [nn.Conv2d(c, out_channels, 1, bias=norm is None)]
            layer = [nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=norm is None)]
            if norm is not None:
                inner.append(GroupNorm32(out_channels) if norm == "gn" else norm_layer(norm)(out_channels))
                layer.append(GroupNorm32(out_channels) if norm == "gn" else norm_layer(norm)(out_channels))
            self.inner_blocks.append(nn.Sequential(*inner))
            self.layer_blocks.append(nn.Sequential(*layer))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.out_channels = out_channels

    def forward(self, feats: Dict[str, Tensor]) -> Dict[str, Tensor]:
        names = list(feats.keys())
        xs = list(feats.values())
        last = self.inner_blocks[-1](xs[-1])
        outs = [self.layer_blocks[-1](last)]
        for i in range(len(xs) - 2, -1, -1):
            lateral = self.inner_blocks[i](xs[i])
            last = lateral + F.interpolate(last, size=lateral.shape[-2:], mode="nearest")
            outs.insert(0, self.layer_blocks[i](last))
        result = OrderedDict(zip(names, outs))
        result["pool"] = F.max_pool2d(outs[-1], 1, 2, 0)
        return result


class BackboneWithFPN(nn.Module):
    """``body`` (a ResNet) followed by ``fpn``; outputs {"0", "1", "2", "3", "pool"} with
    strides 4, 8, 16, 32, 64 and ``out_channels`` channels each."""

    def __init__(self, body: ResNetBody, out_channels: int = 256, fpn_norm: Optional[str] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramid(body.out_channels, out_channels, fpn_norm)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.fpn(self.body(x))


def resnet_fpn_backbone(depth: int = 50, norm: str = "frozen_bn", trainable_layers: int = 3,
                        out_channels: int = 256, width: int = 64, fpn_norm: Optional[str] = None) -> BackboneWithFPN:
    return BackboneWithFPN(ResNetBody(depth, norm, trainable_layers, width), out_channels, fpn_norm)
