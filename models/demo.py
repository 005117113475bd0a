"""Run a trained checkpoint (any registered detector) on one image and draw its detections.

    python -m instseg_ops.models.demo --checkpoint RUN_DIR/model_final.pth --image IN.png \\
        --out OUT.png [--score-thresh 0.5] [--min-shown K] [--device cpu|cuda]

The output PNG has the input's size: each detection's mask alpha-blended in its own colour,
its box outlined and "label score" written above the box (Pillow's default font). Masks are
blended with numpy, boxes and labels drawn with Pillow's ImageDraw; images are read and written
with instseg_ops.models.data.read_image / write_image.
"""
import argparse
import sys
from functools import lru_cache
from typing import Dict, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.io import read_image, write_image
from .engine.checkpoint import model_from_checkpoint

# Distinct colours for up to 12 detections, then repeated.
PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
], dtype=np.uint8)


@lru_cache(maxsize=8)
def _font(size: int):
    """Pillow's default font at ``size`` pixels; its fixed-size bitmap font when Pillow was
    built without FreeType."""
    try:
        return ImageFont.load_default(size)
    except (ImportError, OSError, TypeError):
        return ImageFont.load_default()


def _clipped_box(box: Sequence[float], height: int, width: int):
    """(x1, y1, x2, y2) rounded to whole pixels, ordered and clipped to the image (inclusive
    ends), or None when nothing of it is inside."""
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, x2 = max(min(x1, x2), 0), min(max(x1, x2), width - 1)
    y1, y2 = max(min(y1, y2), 0), min(max(y1, y2), height - 1)
    if x1 > x2 or y1 > y2:
        return None
    return x1, y1, x2, y2


def _text_color(bg) -> np.ndarray:
    luminance = 0.299 * float(bg[0]) + 0.587 * float(bg[1]) + 0.114 * float(bg[2])
    return np.array([0, 0, 0] if luminance > 140 else [255, 255, 255], dtype=np.uint8)


def draw_detections(image: np.ndarray, boxes, labels, scores, masks=None, names: Optional[Dict[int, str]] = None,
                    alpha: float = 0.5) -> np.ndarray:
    """Returns a copy of the uint8 RGB ``image`` [H, W, 3] with the detections drawn: masks
    (bool/uint8 [K, H, W]) blended with ``alpha``, box outlines, and "name score" labels."""
    out = np.array(image, dtype=np.uint8, copy=True)
    H, W = out.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    names = names or {}
    thickness = max(1, min(H, W) // 256)
    font = _font(max(10, int(round(min(H, W) / 40))))
    pad = 1 + thickness // 2
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    if masks is not None and len(boxes):
        m = np.asarray(masks).reshape(len(boxes), H, W).astype(bool)
        blended = out.astype(np.float32)
        for i in range(len(boxes)):
            blended[m[i]] = (1 - alpha) * blended[m[i]] + alpha * colors[i].astype(np.float32)
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    canvas = Image.fromarray(out)
    draw = ImageDraw.Draw(canvas)
    for i in range(len(boxes)):
        box = _clipped_box(boxes[i], H, W)
        if box is not None:
            draw.rectangle(box, outline=tuple(int(c) for c in colors[i]), width=thickness)
    for i in range(len(boxes)):  # labels last, so that no box is drawn over a label
        label = int(labels[i])
        text = f"{names.get(label, str(label))} {scores[i]:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left + 2 * pad, bottom - top + 2 * pad
        x1, y1 = boxes[i][0], boxes[i][1]
        y = int(y1 - th if y1 - th >= 0 else y1 + thickness)  # above the box, or inside at the top
        x = min(max(0, int(x1)), max(0, W - tw))
        draw.rectangle((x, y, x + tw - 1, y + th - 1), fill=tuple(int(c) for c in colors[i]))
        draw.text((x + pad - left, y + pad - top), text, font=font, fill=tuple(int(c) for c in _text_color(colors[i])))
    return np.asarray(canvas).copy()


def load_model(checkpoint: str, device: str = "cpu"):
    """(model in eval mode, {label: name}) from a checkpoint written by the trainer."""
    model, names, _ = model_from_checkpoint(checkpoint, device)
    return model, names


@torch.no_grad()
def run_demo(checkpoint: str, image_path: str, out_path: str, score_thresh: float = 0.5, device: str = "cpu",
             model=None, names=None, min_shown: int = 0) -> Dict[str, np.ndarray]:
    """Detects on ``image_path``, writes the drawing to ``out_path``; returns the drawn detections:
    those scoring ``>= score_thresh``, or the ``min_shown`` best when fewer pass (a briefly
    trained model's scores are low; each drawn label shows its score)."""
    if model is None:
        model, names = load_model(checkpoint, device)
    rgb = read_image(image_path)  # RGB uint8 [H, W, 3], any format Pillow reads
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0).to(device)
    pred = model([tensor])[0]
    keep = pred["scores"] >= score_thresh
    if int(keep.sum()) < min_shown:
        keep = torch.zeros_like(keep)
        keep[pred["scores"].argsort(descending=True)[:min_shown]] = True
    boxes = pred["boxes"][keep].cpu().numpy()
    labels = pred["labels"][keep].cpu().numpy()
    scores = pred["scores"][keep].cpu().numpy()
    masks = pred["masks"][keep]
    if masks.dim() == 4:
        masks = masks[:, 0]
    masks = (masks > 0.5).cpu().numpy()
    drawn = draw_detections(rgb, boxes, labels, scores, masks, names)
    write_image(out_path, drawn)
    return {"boxes": boxes, "labels": labels, "scores": scores, "masks": masks,
            "names": [(names or {}).get(int(lab), str(int(lab))) for lab in labels]}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m instseg_ops.models.demo", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="checkpoint written by instseg_ops.models.train")
    p.add_argument("--image", required=True, help="input image (PNG, JPEG, ...: any format Pillow reads)")
    p.add_argument("--out", required=True, help="output image (PNG; the format follows the suffix)")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--min-shown", type=int, default=0,
                   help="draw at least this many detections (the best ones) even below --score-thresh")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = p.parse_args(argv)
    det = run_demo(args.checkpoint, args.image, args.out, args.score_thresh, args.device,
                   min_shown=args.min_shown)
    for box, label, name, score in zip(det["boxes"], det["labels"], det["names"], det["scores"]):
        print(f"{name} (label {int(label)}) score {float(score):.3f} box {[round(float(v), 1) for v in box]}")
    above = int((det["scores"] >= args.score_thresh).sum())
    extra = f", and the {len(det['scores']) - above} best below it" if len(det["scores"]) > above else ""
    print(f"{above} detections >= {args.score_thresh}{extra}; wrote {args.out}")


if __name__ == "__main__":
    main(sys.argv[1:])
