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


def load_split(data_dir: str, split: str = "val"):
    """The ``split`` of a data directory (``SPLIT/*.png``, ``annotations/instances_SPLIT.json``)."""
    from .data import CocoInstanceDataset
    ann = os.path.join(data_dir, "annotations", f"instances_{split}.json")
    return CocoInstanceDataset(os.path.join(data_dir, split), ann)


def evaluation_parser(prog: str, description: str, checkpoint_help: str) -> argparse.ArgumentParser:
    """The options every evaluation command takes: --checkpoint, --data, --split, --max-images,
    --device, --threads, --json."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--checkpoint", required=True, help=checkpoint_help)
    p.add_argument("--data", required=True, help="data directory (SPLIT/*.png, annotations/instances_SPLIT.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--max-images", type=int, default=0, help="evaluate the first N images (0: all)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    p.add_argument("--json", help="also write the full result to this file")
    return p


def write_json(result: Dict[str, Any], path: Optional[str]) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, sort_keys=True)


def evaluate_checkpoint(checkpoint: str, data_dir: str, split: str = "val", max_images: int = 0,
                        device: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """COCO AP of ``checkpoint`` on ``data_dir``'s ``split`` (rank 0's result; None on others)."""
    info = setup_distributed(device)
    model, _, _ = model_from_checkpoint(checkpoint, str(info.device))
    return evaluate(model, load_split(data_dir, split), info, max_images=max_images)


def main(argv=None):
    p = evaluation_parser("python -m instseg_ops.models.evaluate", __doc__.split("\n")[0],
                          "checkpoint written by instseg_ops.models.train")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.max_images, args.device)
    if result is not None:
        print(", ".join(f"{k} {v:.4f}" for k, v in summarize_eval(result).items()))
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
