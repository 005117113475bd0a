"""Building blocks of the detectors: anchors, box ops and coder, matcher and sampler, region
proposals, the RoI geometry and poolers, the second stage's box and mask stages, and the
image transform."""
from .anchors import AnchorGenerator
from .boxes import BoxCoder, box_area, box_iou, clip_boxes
from .fcos import FCOS, FCOSHead, fcos_inference, fcos_losses, fcos_targets
from .matcher import BalancedSampler, Matcher
from .poolers import RoIGeometry, mask_targets
from .roi_heads import (
                        BoxPredictor,
                        BoxStage,
                        MaskHead,
                        MaskPredictor,
                        RoIHeads,
                        SampledProposals,
                        TwoMLPHead,
                        detect,
                        label_and_sample,
                        mask_loss,
                        match_and_label,
)
from .rpn import RegionProposalNetwork, RPNHead
from .transform import DetectionTransform

__all__ = ["AnchorGenerator", "BoxCoder", "box_area", "box_iou", "clip_boxes", "BalancedSampler", "Matcher",
           "RoIGeometry", "mask_targets", "BoxPredictor", "BoxStage", "MaskHead", "MaskPredictor", "RoIHeads",
           "SampledProposals", "TwoMLPHead", "detect", "label_and_sample", "mask_loss", "match_and_label",
           "RegionProposalNetwork", "RPNHead", "DetectionTransform", "FCOS", "FCOSHead", "fcos_inference",
           "fcos_losses", "fcos_targets"]
