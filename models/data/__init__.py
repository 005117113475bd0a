"""Data for training and evaluating the models: a synthetic shapes dataset in COCO layout
(``synthetic``; command line in ``shapes``), a COCO-format dataset with transforms
(``coco``), COCO evaluation (``coco_eval``) and a dependency-free PNG codec (``png``).
"""
from .coco import (CocoInstanceDataset, Compose, RandomHorizontalFlip, Resize, collate_fn, hflip,
                   load_coco_json, read_image)
from .coco_eval import Evaluator, evaluate_coco
from .png import decode_png, encode_png, read_png, write_png
from .synthetic import CATEGORIES, generate_split, render_sample

__all__ = [
    "CocoInstanceDataset", "Compose", "Resize", "RandomHorizontalFlip", "hflip", "collate_fn",
    "load_coco_json", "read_image", "Evaluator", "evaluate_coco",
    "CATEGORIES", "generate_split", "render_sample",
    "decode_png", "encode_png", "read_png", "write_png",
]
