"""Segment Anything (SAM): the promptable model, segment-anything's ``SamPredictor`` and
``SamAutomaticMaskGenerator`` APIs, and its checkpoint layouts (official, transformers)."""
from .amg import SamAutomaticMaskGenerator
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder
from .model import (
    Sam,
    build_sam,
    build_sam_vit_b,
    build_sam_vit_h,
    build_sam_vit_l,
    sam_model_registry,
    sam_state_dict_to_transformers,
    sam_vit_b,
    sam_vit_h,
    sam_vit_l,
    sam_vit_tiny,
)
from .predictor import SamPredictor
from .training import TrainableSam, sam_tiny_shapes
from .prompt_encoder import PromptEncoder
from .transformer import TwoWayTransformer
from .transforms import ResizeLongestSide

__all__ = ["Sam", "build_sam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "sam_vit_tiny", "sam_model_registry",
           "build_sam_vit_b", "build_sam_vit_l", "build_sam_vit_h", "sam_state_dict_to_transformers",
           "SamPredictor", "SamAutomaticMaskGenerator", "ImageEncoderViT", "PromptEncoder", "MaskDecoder",
           "TwoWayTransformer", "ResizeLongestSide", "TrainableSam", "sam_tiny_shapes"]
