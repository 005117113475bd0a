"""Evaluate a trained checkpoint (COCO bbox and segm AP) on a COCO-format data set.

    python -m instseg_ops.models.evaluate --checkpoint RUN_DIR/model_final.pth --data DIR \\
        [--split val] [--max-images N] [--device cpu|cuda] [--threads T]

DIR holds ``SPLIT/*.png`` and ``annotations/instances_SPLIT.json`` (as written by
``python -m instseg_ops.models.data.shapes``). Under torchrun the images are sharded over the
processes and the evaluator merges their results.
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, Optional

import torch

from .engine.checkpoint import model_from_checkpoint
from .engine.distributed import setup_distributed
from .engine.evaluation import evaluate
from .engine.hooks import summarize_eval


def evaluate_checkpoint(checkpoint: str, data_dir: str, split: str = "val", max_images: int = 0,
                        device: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """COCO AP of ``checkpoint`` on ``data_dir``'s ``split`` (rank 0's result; None on others)."""
    from .data import CocoInstanceDataset
    info = setup_distributed(device)
    model, _, _ = model_from_checkpoint(checkpoint, str(info.device))
    ann = os.path.join(data_dir, "annotations", f"instances_{split}.json")
    dataset = CocoInstanceDataset(os.path.join(data_dir, split), ann)
    return evaluate(model, dataset, info, max_images=max_images)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m instseg_ops.models.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint written by instseg_ops.models.train")
    p.add_argument("--data", required=True, help="data directory (images and COCO annotations)")
    p.add_argument("--split", default="val")
    p.add_argument("--max-images", type=int, default=0, help="evaluate the first N images (0: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    p.add_argument("--json", help="also write the full result to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.max_images, args.device)
    if result is not None:
        print(", ".join(f"{k} {v:.4f}" for k, v in summarize_eval(result).items()))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1, sort_keys=True)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
