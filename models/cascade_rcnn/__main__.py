"""``python -m instseg_ops.models.cascade_rcnn --stage-iou CHECKPOINT --data DIR``: per cascade
stage, the mean IoU of its input boxes with their matched ground truth and the fraction above
0.7, on a trained checkpoint over a COCO-format split (``stage_iou``)."""
import argparse
import json
import sys

import torch

from .stage_iou import run_cli


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m instseg_ops.models.cascade_rcnn", description=__doc__.split("\n")[0])
    p.add_argument("--stage-iou", metavar="CHECKPOINT", required=True,
                   help="a Cascade Mask R-CNN checkpoint written by instseg_ops.models.train")
    p.add_argument("--data", required=True, help="data directory (SPLIT/*.png, annotations/instances_SPLIT.json)")
    p.add_argument("--split", default="val")
    p.add_argument("--max-images", type=int, default=0, help="the first N images (0: all)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows, table = run_cli(args.stage_iou, args.data, args.split, args.max_images, args.device)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
