"""Feature pyramid (FPN, Lin et al. 2017) on a backbone body, with a pluggable top block.

Module and parameter names follow torchvision's (``fpn.inner_blocks.i.0``,
``fpn.layer_blocks.i.0``), so its detection checkpoints load with ``strict=True``. The extra
coarse levels are a strategy object, as detectron2's ``top_block``: ``LastLevelMaxPool`` (one
stride-2 max pool of the coarsest output: Mask R-CNN's P6 for the RPN) or ``LastLevelP6P7``
(P6 by a stride-2 3x3 conv of P5 or C5, P7 from relu(P6): RetinaNet, FCOS, CenterMask).
"""
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .norms import norm_layer
from .resnet import ResNetBody


class LastLevelMaxPool(nn.Module):
    """One extra level: ``F.max_pool2d(P_last, 1, 2)`` (kernel 1, stride 2)."""

    in_feature = "p"  # reads the coarsest FPN output

    def __init__(self, name: str = "pool"):
        super().__init__()
        self.names = [name]

    def forward(self, coarsest_output: Tensor, coarsest_input: Tensor) -> List[Tensor]:
        return [F.max_pool2d(coarsest_output, 1, 2, 0)]


class LastLevelP6P7(nn.Module):
    """Two extra levels: P6 = conv3x3/2(x), P7 = conv3x3/2(relu(P6)), where x is the coarsest
    FPN output (``use_p5=True``, FCOS and CenterMask) or the coarsest body feature (C5,
    RetinaNet's original)."""

    def __init__(self, in_channels: int, out_channels: int, use_p5: bool = True, names: Sequence[str] = ("p6", "p7")):
        super().__init__()
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, 2, 1)
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, 2, 1)
        for m in (self.p6, self.p7):
            nn.init.kaiming_uniform_(m.weight, a=1)
            nn.init.zeros_(m.bias)
        self.use_p5 = use_p5
        self.in_feature = "p" if use_p5 else "c"
        self.names = list(names)

    def forward(self, coarsest_output: Tensor, coarsest_input: Tensor) -> List[Tensor]:
        p6 = self.p6(coarsest_output if self.use_p5 else coarsest_input)
        return [p6, self.p7(F.relu(p6))]


class FeaturePyramid(nn.Module):
    """Lateral 1x1 convs, top-down nearest upsampling, 3x3 output convs, then ``top_block``'s
    extra levels (None: none). Outputs keep the input names, then the top block's names."""

    def __init__(self, in_channels: List[int], out_channels: int = 256, norm: Optional[str] = None,
                 top_block: Optional[nn.Module] = None):
        super().__init__()
        self.inner_blocks = nn.ModuleList()
        self.layer_blocks = nn.ModuleList()
        for c in in_channels:
            inner = [nn.Conv2d(c, out_channels, 1, bias=norm is None)]
            layer = [nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=norm is None)]
            if norm is not None:
                inner.append(norm_layer(norm)(out_channels))
                layer.append(norm_layer(norm)(out_channels))
            self.inner_blocks.append(nn.Sequential(*inner))
            self.layer_blocks.append(nn.Sequential(*layer))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.top_block = top_block  # registered after the convs: torchvision's parameter order
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
        if self.top_block is not None:
            result.update(zip(self.top_block.names, self.top_block(outs[-1], xs[-1])))
        return result


class BackboneWithFPN(nn.Module):
    """``body`` (returning an ordered dict of features) followed by ``fpn``. ``out_features``
    and ``strides`` name the output levels and their strides, finest first: for a ResNet with
    the default top block {"0", "1", "2", "3", "pool"} at strides 4, 8, 16, 32, 64, with
    ``out_channels`` channels each."""

    def __init__(self, body: nn.Module, out_channels: int = 256, fpn_norm: Optional[str] = None,
                 top_block: Optional[nn.Module] = None):
        super().__init__()
        self.body = body
        if top_block is None:
            top_block = LastLevelMaxPool()
        self.fpn = FeaturePyramid(body.out_channels, out_channels, fpn_norm, top_block)
        self.out_channels = out_channels
        body_names = list(body.out_features)
        body_strides = list(body.strides)
        extra = top_block.names
        self.out_features: List[str] = body_names + list(extra)
        self.strides: Dict[str, int] = dict(zip(body_names, body_strides))
        for i, name in enumerate(extra):
            self.strides[name] = body_strides[-1] * 2 ** (i + 1)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.fpn(self.body(x))


def resnet_fpn_backbone(depth: int = 50, norm: str = "frozen_bn", trainable_layers: int = 3,
                        out_channels: int = 256, width: int = 64, fpn_norm: Optional[str] = None,
                        top_block: Optional[nn.Module] = None) -> BackboneWithFPN:
    """A ResNet body (``ResNetBody``) with an FPN; ``top_block`` defaults to ``LastLevelMaxPool``."""
    return BackboneWithFPN(ResNetBody(depth, norm, trainable_layers, width), out_channels, fpn_norm, top_block)
