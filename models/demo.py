"""Run a trained checkpoint (any registered detector) on one image and draw its detections.

    python -m instseg_ops.models.demo --checkpoint RUN_DIR/model_final.pth --image IN.png \\
        --out OUT.png [--score-thresh 0.5] [--min-shown K] [--device cpu|cuda]

The output PNG has the input's size: each detection's mask alpha-blended in its own colour,
its box outlined and "label score" written above the box with a built-in 5x7 bitmap font.
Drawing is plain numpy; images are read and written with instseg_ops.models.data.read_image /
write_image (Pillow).
"""
import argparse
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .data.io import read_image, write_image
from .engine.checkpoint import model_from_checkpoint

# 5x7 glyphs: 7 rows per character, the low 5 bits of each row byte are the pixels (MSB left).
_GLYPHS_HEX = {
    "0": "0E 11 13 15 19 11 0E", "1": "04 0C 04 04 04 04 0E", "2": "0E 11 01 02 04 08 1F",
    "3": "1F 02 04 02 01 11 0E", "4": "02 06 0A 12 1F 02 02", "5": "1F 10 1E 01 01 11 0E",
    "6": "06 08 10 1E 11 11 0E", "7": "1F 01 02 04 08 08 08", "8": "0E 11 11 0E 11 11 0E",
    "9": "0E 11 11 0F 01 02 0C",
    "A": "0E 11 11 1F 11 11 11", "B": "1E 11 11 1E 11 11 1E", "C": "0E 11 10 10 10 11 0E",
    "D": "1C 12 11 11 11 12 1C", "E": "1F 10 10 1E 10 10 1F", "F": "1F 10 10 1E 10 10 10",
    "G": "0E 11 10 17 11 11 0F", "H": "11 11 11 1F 11 11 11", "I": "0E 04 04 04 04 04 0E",
    "J": "07 02 02 02 02 12 0C", "K": "11 12 14 18 14 12 11", "L": "10 10 10 10 10 10 1F",
    "M": "11 1B 15 15 11 11 11", "N": "11 11 19 15 13 11 11", "O": "0E 11 11 11 11 11 0E",
    "P": "1E 11 11 1E 10 10 10", "Q": "0E 11 11 11 15 12 0D", "R": "1E 11 11 1E 14 12 11",
    "S": "0F 10 10 0E 01 01 1E", "T": "1F 04 04 04 04 04 04", "U": "11 11 11 11 11 11 0E",
    "V": "11 11 11 11 11 0A 04", "W": "11 11 11 15 15 15 0A", "X": "11 11 0A 04 0A 11 11",
    "Y": "11 11 11 0A 04 04 04", "Z": "1F 01 02 04 08 10 1F",
    ".": "00 00 00 00 00 0C 0C", "-": "00 00 00 1F 00 00 00", "_": "00 00 00 00 00 00 1F",
    ":": "00 0C 0C 00 0C 0C 00", " ": "00 00 00 00 00 00 00", "?": "0E 11 01 02 04 00 04",
    "%": "18 19 02 04 08 13 03", "/": "00 01 02 04 08 10 00",
}


def _glyph_bitmaps() -> Dict[str, np.ndarray]:
    out = {}
    for ch, rows in _GLYPHS_HEX.items():
        bits = [int(r, 16) for r in rows.split()]
        out[ch] = np.array([[(b >> (4 - i)) & 1 for i in range(5)] for b in bits], dtype=bool)
    return out


GLYPHS = _glyph_bitmaps()
GLYPH_W, GLYPH_H, GLYPH_ADVANCE = 5, 7, 6

# Distinct colours for up to 12 detections, then repeated.
PALETTE = np.array([
    [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
    [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40],
], dtype=np.uint8)


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """Boolean bitmap [7*scale, (6*len-1)*scale] of ``text`` (upper-cased; unknown
    characters drawn as '?')."""
    text = text.upper()
    if not text:
        return np.zeros((GLYPH_H * scale, 0), dtype=bool)
    bm = np.zeros((GLYPH_H, GLYPH_ADVANCE * len(text) - 1), dtype=bool)
    for i, ch in enumerate(text):
        bm[:, i * GLYPH_ADVANCE:i * GLYPH_ADVANCE + GLYPH_W] = GLYPHS.get(ch, GLYPHS["?"])
    if scale > 1:
        bm = bm.repeat(scale, axis=0).repeat(scale, axis=1)
    return bm


def draw_text(image: np.ndarray, x: int, y: int, text: str, color, background=None, scale: int = 1) -> None:
    """Writes ``text`` with its top-left corner at (x, y), clipped to the image, optionally on a
    filled background box (1 pixel of padding * scale)."""
    bm = text_mask(text, scale)
    pad = scale
    h, w = bm.shape[0] + 2 * pad, bm.shape[1] + 2 * pad
    H, W = image.shape[:2]
    x0, y0 = int(x), int(y)
    xa, ya, xb, yb = max(x0, 0), max(y0, 0), min(x0 + w, W), min(y0 + h, H)
    if xa >= xb or ya >= yb:
        return
    if background is not None:
        image[ya:yb, xa:xb] = background
    full = np.zeros((h, w), dtype=bool)
    full[pad:pad + bm.shape[0], pad:pad + bm.shape[1]] = bm
    sub = full[ya - y0:yb - y0, xa - x0:xb - x0]
    image[ya:yb, xa:xb][sub] = color


def draw_rectangle(image: np.ndarray, box: Sequence[float], color, thickness: int = 1) -> None:
    """Outline of the box (x1, y1, x2, y2) in pixels, clipped to the image."""
    H, W = image.shape[:2]
    x1, y1, x2, y2 = (int(round(float(v))) for v in box)
    x1, x2 = max(min(x1, x2), 0), min(max(x1, x2), W - 1)
    y1, y2 = max(min(y1, y2), 0), min(max(y1, y2), H - 1)
    if x1 > x2 or y1 > y2:
        return
    t = max(1, thickness)
    image[y1:min(y1 + t, y2 + 1), x1:x2 + 1] = color
    image[max(y2 - t + 1, y1):y2 + 1, x1:x2 + 1] = color
    image[y1:y2 + 1, x1:min(x1 + t, x2 + 1)] = color
    image[y1:y2 + 1, max(x2 - t + 1, x1):x2 + 1] = color


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
    scale = max(1, min(H, W) // 320)
    thickness = max(1, min(H, W) // 256)
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(boxes))]
    if masks is not None and len(boxes):
        m = np.asarray(masks).reshape(len(boxes), H, W).astype(bool)
        blended = out.astype(np.float32)
        for i in range(len(boxes)):
            blended[m[i]] = (1 - alpha) * blended[m[i]] + alpha * colors[i].astype(np.float32)
        out = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    for i in range(len(boxes)):
        draw_rectangle(out, boxes[i], colors[i], thickness)
    for i in range(len(boxes)):  # labels last, so that no box is drawn over a label
        label = int(labels[i])
        text = f"{names.get(label, str(label))} {scores[i]:.2f}"
        th = GLYPH_H * scale + 2 * scale
        x1, y1 = boxes[i][0], boxes[i][1]
        y = y1 - th if y1 - th >= 0 else y1 + thickness  # above the box, or inside at the top
        x = min(max(0, int(x1)), max(0, W - (GLYPH_ADVANCE * len(text) + 1) * scale))
        draw_text(out, x, int(y), text, _text_color(colors[i]), background=colors[i], scale=scale)
    return out


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
