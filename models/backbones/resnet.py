"""ResNet bodies (depth 18/34/50/101; frozen BN, BN or GroupNorm).

Module and parameter names follow torchvision's, so state dicts load with ``strict=True``:
``conv1``, ``bn1``, ``layer1.0.conv1``, ...
"""
from collections import OrderedDict
from typing import Dict, List, Optional

from torch import Tensor, nn

from .norms import norm_layer


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
        # Output names and strides of layer1..layer4 (torchvision's return_layers names).
        self.out_features: List[str] = ["0", "1", "2", "3"]
        self.strides: List[int] = [4, 8, 16, 32]
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
            out[self.out_features[i]] = x
        return out
