"""Data for training and evaluating the models: a synthetic shapes dataset in COCO layout
(``synthetic``; command line in ``shapes``), a COCO-format dataset with transforms
(``coco``), COCO evaluation (``coco_eval``) and image files through Pillow (``io``).
"""
from .coco import CocoInstanceDataset, Compose, RandomHorizontalFlip, hflip, load_coco_json
from .coco_eval import Evaluator, evaluate_coco
from .io import read_image, write_image
from .synthetic import CATEGORIES, generate_split, render_sample

__all__ = [
    "CocoInstanceDataset", "Compose", "RandomHorizontalFlip", "hflip",
    "load_coco_json", "read_image", "write_image", "Evaluator", "evaluate_coco",
    "CATEGORIES", "generate_split", "render_sample",
]
