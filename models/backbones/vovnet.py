"""VoVNetV2 bodies (Lee et al., "CenterMask: Real-Time Anchor-Free Instance Segmentation", 2020):
one-shot-aggregation (OSA) modules with the identity mapping and effective squeeze-excitation
(eSE), as centermask2's ``vovnet.py``.

- conv unit: 3x3 (or 1x1) conv without bias, norm, ReLU; the depthwise variants' unit is a
  depthwise 3x3 conv, a pointwise 1x1 conv, norm, ReLU.
- stem: three units (3 -> s0 stride 2, s0 -> s1, s1 -> s2 stride 2; the last two depthwise in
  the "-dw" bodies): output stride 4.
- stage 2..5: a 3x3 stride-2 max pool (ceil mode) before stages 3-5, then OSA modules; the
  first maps the stage input to the stage's output channels, the others keep them and add their
  input (identity mapping).
- OSA module: L units in sequence (only the depthwise bodies first reduce the input with a 1x1
  unit when its channels differ), the concatenation of the module's input and every unit's
  output through a 1x1 unit, eSE (global average pool, one 1x1 conv with bias, hard sigmoid
  ``relu6(x + 3) / 6``, product with the input), then the identity. No ReLU after the sum.

``vovnet(name, norm)`` builds a body by name ("V-19-slim-dw", "V-19-dw", "V-19-slim", "V-19",
"V-39", "V-57", "V-99"; an "-eSE" suffix is accepted, as centermask2's config names).
"""
from collections import OrderedDict
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .norms import norm_layer

# name -> (stem channels, stage conv channels, stage output channels, units per OSA module,
#          OSA modules per stage, depthwise)
STAGE_SPECS: Dict[str, Tuple[Tuple[int, ...], Tuple[int, ...], Tuple[int, ...], int, Tuple[int, ...], bool]] = {
    "V-19-slim-dw": ((64, 64, 64), (64, 80, 96, 112), (112, 256, 384, 512), 3, (1, 1, 1, 1), True),
    "V-19-dw": ((64, 64, 64), (128, 160, 192, 224), (256, 512, 768, 1024), 3, (1, 1, 1, 1), True),
    "V-19-slim": ((64, 64, 128), (64, 80, 96, 112), (112, 256, 384, 512), 3, (1, 1, 1, 1), False),
    "V-19": ((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 3, (1, 1, 1, 1), False),
    "V-39": ((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 5, (1, 1, 2, 2), False),
    "V-57": ((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 5, (1, 1, 4, 3), False),
    "V-99": ((64, 64, 128), (128, 160, 192, 224), (256, 512, 768, 1024), 5, (1, 3, 9, 3), False),
}


def _unit(cin: int, cout: int, norm: str, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    """Conv (no bias) -> norm -> ReLU."""
    return nn.Sequential(OrderedDict(
        conv=nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        norm=norm_layer(norm)(cout),
        relu=nn.ReLU(inplace=True)))


def _dw_unit(cin: int, cout: int, norm: str, stride: int = 1) -> nn.Sequential:
    """Depthwise 3x3 conv -> pointwise 1x1 conv (both without bias) -> norm -> ReLU."""
    if cin != cout:
        raise ValueError(f"a depthwise unit keeps its channels, got {cin} -> {cout}")
    return nn.Sequential(OrderedDict(
        dw_conv=nn.Conv2d(cin, cout, 3, stride, 1, groups=cout, bias=False),
        pw_conv=nn.Conv2d(cout, cout, 1, bias=False),
        norm=norm_layer(norm)(cout),
        relu=nn.ReLU(inplace=True)))


class ESE(nn.Module):
    """Effective squeeze-excitation: x * hsigmoid(conv1x1(avgpool(x)))."""

    def __init__(self, channels: int):
        super().__init__()
        self.fc = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        w = self.fc(x.mean((2, 3), keepdim=True))
        return x * (F.relu6(w + 3.0) / 6.0)


class OSAModule(nn.Module):
    """One-shot aggregation with eSE, optionally with the identity mapping (see the module
    docstring)."""

    def __init__(self, in_ch: int, stage_ch: int, concat_ch: int, layers: int, norm: str, *,
                 identity: bool = False, depthwise: bool = False):
        super().__init__()
        if identity and in_ch != concat_ch:
            raise ValueError(f"identity mapping needs in_ch == concat_ch, got {in_ch} and {concat_ch}")
        self.identity = identity
        self.reduction = _unit(in_ch, stage_ch, norm, 1) if depthwise and in_ch != stage_ch else None
        self.layers = nn.ModuleList()
        c = in_ch
        for _ in range(layers):
            if depthwise:
                self.layers.append(_dw_unit(stage_ch, stage_ch, norm))
            else:
                self.layers.append(_unit(c, stage_ch, norm))
            c = stage_ch
        self.concat = _unit(in_ch + layers * stage_ch, concat_ch, norm, 1)
        self.ese = ESE(concat_ch)

    def forward(self, x: Tensor) -> Tensor:
        outs = [x]
        y = self.reduction(x) if self.reduction is not None else x
        for layer in self.layers:
            y = layer(y)
            outs.append(y)
        y = self.ese(self.concat(torch.cat(outs, dim=1)))
        return y + x if self.identity else y


class VoVNetBody(nn.Module):
    """VoVNetV2 stem and stages 2-5; returns an ordered dict of the stages in ``out_features``
    (default stage3-stage5, as CenterMask) at strides 4/8/16/32 for stage2..stage5.
    ``out_channels`` and ``strides`` list the returned stages' channels and strides (the FPN
    reads them)."""

    def __init__(self, name: str = "V-39", norm: str = "frozen_bn",
                 out_features: Sequence[str] = ("stage3", "stage4", "stage5"), width: float = 1.0):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        key = name[:-4] if name.endswith("-eSE") else name
        if key not in STAGE_SPECS:
            raise ValueError(f"unknown VoVNet {name!r}; known: {', '.join(STAGE_SPECS)}")
        all_stages = ["stage2", "stage3", "stage4", "stage5"]
        for f in out_features:
            if f not in all_stages:
                raise ValueError(f"out_features must be among {all_stages}, got {f!r}")
        norm_layer(norm)  # validates the name
        stem, conv_ch, out_ch, layers, blocks, depthwise = STAGE_SPECS[key]
        if width != 1.0:  # every width scaled (multiples of 8), e.g. for small images on a CPU
            stem, conv_ch, out_ch = ([max(8, int(round(c * width / 8)) * 8) for c in chs] for chs in (stem, conv_ch, out_ch))
        self.name = key
        stem_unit = _dw_unit if depthwise else _unit
        self.stem = nn.Sequential(OrderedDict(
            stem_1=_unit(3, stem[0], norm, 3, 2),
            stem_2=stem_unit(stem[0], stem[1], norm, stride=1),
            stem_3=stem_unit(stem[1], stem[2], norm, stride=2)))
        cin = stem[2]
        for i in range(4):
            modules = OrderedDict()
            if i > 0:
                modules["pool"] = nn.MaxPool2d(3, 2, ceil_mode=True)
            for j in range(blocks[i]):
                modules[f"osa{j + 1}"] = OSAModule(cin if j == 0 else out_ch[i], conv_ch[i], out_ch[i], layers, norm,
                                                   identity=j > 0, depthwise=depthwise)
            self.add_module(all_stages[i], nn.Sequential(modules))
            cin = out_ch[i]
        self.out_features: List[str] = [f for f in all_stages if f in out_features]
        self.out_channels: List[int] = [out_ch[all_stages.index(f)] for f in self.out_features]
        self.strides: List[int] = [2 ** (all_stages.index(f) + 2) for f in self.out_features]
        self._last = max(all_stages.index(f) for f in self.out_features)
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and not (m.kernel_size == (1, 1) and m.bias is not None):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VoVNet expects images [N, 3, H, W], got shape {tuple(x.shape)}")
        x = self.stem(x)
        out = OrderedDict()
        for i, stage in enumerate(("stage2", "stage3", "stage4", "stage5")[: self._last + 1]):
            x = getattr(self, stage)(x)
            if stage in self.out_features:
                out[stage] = x
        return out


def vovnet(name: str = "V-39", norm: str = "frozen_bn",
           out_features: Sequence[str] = ("stage3", "stage4", "stage5"), width: float = 1.0) -> VoVNetBody:
    """A VoVNetV2 body by name ("V-19-slim-dw", "V-19-dw", "V-19-slim", "V-19", "V-39", "V-57",
    "V-99"; "-eSE" suffix optional) with ``norm`` "frozen_bn" (pretrained weights, centermask2's
    default), "bn" or "gn" (trainable, from scratch). ``width`` scales every channel count
    (rounded to multiples of 8; 1.0: the reference's bodies)."""
    return VoVNetBody(name, norm, out_features, width)
