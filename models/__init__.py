"""Instance segmentation models built on instseg_ops (installed as instseg_ops.models).

Empty for now: Mask R-CNN, CenterMask and Cascade Mask R-CNN land in later issues.
"""
