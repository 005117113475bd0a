"""Mask2Former (and MaskFormer): query-based instance segmentation on instseg_ops'
multi-scale deformable attention. ``model.py`` has the model and its registered builders,
``pixel_decoder.py`` / ``transformer_decoder.py`` the two halves, ``matcher.py`` and
``criterion.py`` the training losses, ``layouts.py`` the transformers and official
checkpoint layouts for ``load_pretrained``."""
from . import layouts  # noqa: F401  (registers the checkpoint layouts)
from .criterion import SetCriterion
from .matcher import HungarianMatcher, point_sample, uncertain_point_coords
from .maskformer import MaskFormer, maskformer_resnet, maskformer_resnet50
from .model import (Mask2Former, instance_inference, mask2former_r18_shapes, mask2former_resnet,
                    mask2former_resnet50, mask2former_resnet101)
from .pixel_decoder import MSDeformAttnPixelDecoder
from .transformer_decoder import MultiScaleMaskedTransformerDecoder, attention_mask_from_logits

__all__ = ["Mask2Former", "MSDeformAttnPixelDecoder", "MultiScaleMaskedTransformerDecoder", "HungarianMatcher",
           "SetCriterion", "point_sample", "uncertain_point_coords", "instance_inference",
           "attention_mask_from_logits", "mask2former_resnet", "mask2former_resnet50", "mask2former_resnet101",
           "mask2former_r18_shapes", "MaskFormer", "maskformer_resnet", "maskformer_resnet50"]
