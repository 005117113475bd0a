"""Backbones shared by the model families: ResNet bodies, the FPN with its top blocks, and
the normalisation layers they use."""
from .fpn import BackboneWithFPN, FeaturePyramid, LastLevelMaxPool, LastLevelP6P7, resnet_fpn_backbone
from .norms import FrozenBatchNorm2d, GroupNorm32, norm_layer
from .resnet import ResNetBody
from .vovnet import OSAModule, VoVNetBody, vovnet

__all__ = ["BackboneWithFPN", "FeaturePyramid", "LastLevelMaxPool", "LastLevelP6P7", "resnet_fpn_backbone",
           "FrozenBatchNorm2d", "GroupNorm32", "norm_layer", "ResNetBody", "OSAModule",
           "VoVNetBody", "vovnet"]
