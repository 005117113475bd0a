"""Segment Anything you can look at: the automatic mask generator on shapes it never saw, drawn to a PNG.

    python -m instseg_ops.models.sam.demo --out sam_demo.png                  # shipped checkpoint, fresh images
    python -m instseg_ops.models.sam.demo --out sam_demo.png --image IN.png   # any picture (resized to 256 px inside)
    python -m instseg_ops.models.sam.demo --out sam_demo.png --checkpoint RUN_DIR/model_final.pth

With no ``--image`` the demo generates ``--num-images`` shapes images of its own split ("demo",
seeded by ``--seed``; the model trained on split "train" of seed 0), runs
``SamAutomaticMaskGenerator`` on each (a grid of ``--points-per-side`` squared points, the
official thresholds unless changed), and draws one row per image: the image with its ground
truth, and the generated masks (alpha-blended, their boxes, the predicted IoU). It also says how
many objects a generated mask covers at mask IoU >= 0.5 (class-agnostic: SAM has no classes).
The default checkpoint ships with the package (``assets/sam_tiny_shapes.pth``: float16 weights
of the ``shapes_sam_tiny_cpu`` preset's 29-minute CPU run, see benchmarks/RESULTS.md).
"""
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

from ..data.io import read_image, write_image
from ..demo import (ASSETS, _boxes_of, _caption, _tile, _upscale, demo_images, demo_parser, draw_detections,
                    match_detections, parse_demo_args, pick_demo_seed)
from ..engine.checkpoint import model_from_checkpoint
from ..evaluate import write_json
from .amg import SamAutomaticMaskGenerator

SAM_DEMO_CHECKPOINT = os.path.join(ASSETS, "sam_tiny_shapes.pth")


def load_generator(checkpoint: str, device: str = "cpu", **amg_kwargs) -> SamAutomaticMaskGenerator:
    """The automatic mask generator on a SAM checkpoint written by the trainer (or exported)."""
    model, _, _ = model_from_checkpoint(checkpoint, device)
    return SamAutomaticMaskGenerator(model, **amg_kwargs)


def _as_arrays(records: List[Dict], hw) -> Dict[str, np.ndarray]:
    """The generator's records (binary_mask mode) for an image of size ``hw``, largest first ->
    masks, boxes XYXY, scores."""
    records = sorted(records, key=lambda r: -r["area"])
    if not records:
        return {"masks": np.zeros((0,) + tuple(hw), dtype=bool), "boxes": np.zeros((0, 4)), "scores": np.zeros(0)}
    boxes = np.array([r["bbox"] for r in records], dtype=np.float64)
    boxes[:, 2:] += boxes[:, :2]
    return {"masks": np.stack([r["segmentation"] for r in records]), "boxes": boxes,
            "scores": np.array([r["predicted_iou"] for r in records])}


def _draw_row(image: np.ndarray, gen: Dict[str, np.ndarray], gt_masks: Optional[np.ndarray], scale: int,
              caption_left: str, caption_right: str) -> List[np.ndarray]:
    cap = 14 * scale
    big, gen_masks = _upscale(image, gen["masks"], scale)
    if gt_masks is not None:
        _, gt_big = _upscale(image, gt_masks, scale)
        left = draw_detections(big, _boxes_of(gt_big), np.zeros(len(gt_big), dtype=np.int64), None, gt_big,
                               {0: "object"})
    else:
        left = big
    right = draw_detections(big, gen["boxes"] * scale, np.zeros(len(gen["scores"]), dtype=np.int64), gen["scores"],
                            gen_masks, {0: "iou"})
    return [_caption(left, caption_left, cap), _caption(right, caption_right, cap)]


@torch.no_grad()
def run_sam_demo(out_path: str, generator: SamAutomaticMaskGenerator, num_images: int = 3, seed: int = 0,
                 size: int = 256, scale: int = 2) -> Dict[str, object]:
    """``num_images`` fresh shapes images through ``generator``; writes the drawing to
    ``out_path`` and returns the counts it prints (objects, objects covered by a generated mask
    at IoU >= 0.5, their mean IoU, generated masks, seconds per image)."""
    rows, total, covered, masks_made, ious, seconds = [], 0, 0, 0, [], 0.0
    for i, (image, gt) in enumerate(demo_images(seed, num_images, size)):
        t0 = time.perf_counter()
        gen = _as_arrays(generator.generate(image), image.shape[:2])
        seconds += time.perf_counter() - t0
        n = len(gen["scores"])
        gt_iou, pred_match = match_detections(np.zeros(n), gen["scores"], gen["masks"], np.zeros(len(gt["labels"])),
                                              gt["masks"])
        hit = gt_iou > 0
        total, covered, masks_made = total + len(gt_iou), covered + int(hit.sum()), masks_made + n
        ious += [float(v) for v in gt_iou[hit]]
        mean = f", IoU {gt_iou[hit].mean():.2f}" if hit.any() else ""
        rows.append(_draw_row(image, gen, gt["masks"], scale, f"image {i}: ground truth, {len(gt_iou)} objects",
                              f"{n} masks: {int(hit.sum())}/{len(gt_iou)} objects covered{mean}"))
        print(f"image {i}: {len(gt_iou)} objects, {n} masks generated, {int(hit.sum())} objects covered "
              f"(mask IoU >= 0.5{mean}), {int((pred_match < 0).sum())} masks match no object", flush=True)
    write_image(out_path, _tile(rows))
    return {"images": num_images, "objects": total, "covered": covered, "masks": masks_made, "seed": seed,
            "mean_mask_iou": float(np.mean(ious)) if ious else 0.0, "seconds_per_image": seconds / max(1, num_images),
            "out": out_path}


def main(argv=None):
    p = demo_parser("python -m instseg_ops.models.sam.demo", __doc__.split("\n")[0],
                    "a SAM checkpoint written by instseg_ops.models.train (default: the shipped shapes model)")
    p.add_argument("--image", default=None, help="run on this image (any format Pillow reads) instead of generated ones")
    p.add_argument("--points-per-side", type=int, default=32, help="the generator's grid (official default 32)")
    p.add_argument("--pred-iou-thresh", type=float, default=0.5,
                   help="the official default is 0.88; the shipped shapes model predicts lower IoUs (default 0.5)")
    p.add_argument("--stability-score-thresh", type=float, default=0.7,
                   help="the official default is 0.95 (default 0.7, as --pred-iou-thresh)")
    p.add_argument("--min-mask-region-area", type=int, default=0)
    args = parse_demo_args(p, argv)
    checkpoint = args.checkpoint or SAM_DEMO_CHECKPOINT
    if not os.path.exists(checkpoint):
        sys.exit(f"checkpoint {checkpoint} not found")
    t0 = time.perf_counter()
    generator = load_generator(checkpoint, args.device, points_per_side=args.points_per_side,
                               pred_iou_thresh=args.pred_iou_thresh, stability_score_thresh=args.stability_score_thresh,
                               min_mask_region_area=args.min_mask_region_area)
    print(f"model: {checkpoint} (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
    if args.image:
        image = read_image(args.image)
        t0 = time.perf_counter()
        gen = _as_arrays(generator.generate(image), image.shape[:2])
        secs = time.perf_counter() - t0
        write_image(args.out, _tile([_draw_row(image, gen, None, 1, args.image, f"{len(gen['scores'])} masks")]))
        print(f"{args.image}: {len(gen['scores'])} masks in {secs:.2f} s; wrote {args.out}")
        return
    seed = pick_demo_seed(args.seed, args.num_images)
    s = run_sam_demo(args.out, generator, num_images=args.num_images, seed=seed)
    s["checkpoint"] = checkpoint
    print(f"covered {s['covered']}/{s['objects']} objects with {s['masks']} masks (mask IoU >= 0.5; mean IoU "
          f"{s['mean_mask_iou']:.2f}), {s['seconds_per_image']:.2f} s per image on {args.device}; wrote {args.out}")
    write_json(s, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
