"""Instance segmentation you can look at: a trained model on shapes it never saw, drawn to a PNG.

    python -m instseg_ops.models.demo --out demo.png            # the shipped checkpoint, fresh images
    python -m instseg_ops.models.demo --out demo.png --image IN.png [IN2.png ...]
    python -m instseg_ops.models.demo --out demo.png --checkpoint RUN_DIR/model_final.pth
    python -m instseg_ops.models.demo --out demo.png --train    # retrain the checkpoint first (~30 min)

With no ``--image``, the demo generates ``--num-images`` synthetic shapes images from its own
split ("demo", seeded by ``--seed``; the training data are the "train" split of seed 0, so these
images were never seen), runs the model, and draws one row per image: the ground truth on the
left, the detections on the right (masks alpha-blended, boxes, "label score"). It also matches
detections to the ground truth (same class, mask IoU >= 0.5) and prints how many objects were
found. The default checkpoint ships with the package (``assets/maskrcnn_r18_half_shapes.pth``:
float16 weights of the ``shapes_r18_fast_cpu`` preset's 29-minute CPU run, see
benchmarks/RESULTS.md); ``--train`` reproduces it with the recorded commands.

Masks are blended with numpy, boxes and labels drawn with Pillow's ImageDraw; images are read
and written with instseg_ops.models.data.read_image / write_image.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from functools import lru_cache
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .data.io import read_image, write_image
from .engine.checkpoint import export_checkpoint, model_from_checkpoint
from .evaluate import write_json

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
    (bool/uint8 [K, H, W]) blended with ``alpha``, box outlines, and "name score" labels ("name"
    alone when ``scores`` is None, e.g. for ground truth)."""
    out = np.array(image, dtype=np.uint8, copy=True)
    H, W = out.shape[:2]
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    scores = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)
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
        text = names.get(label, str(label)) + ("" if scores is None else f" {scores[i]:.2f}")
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

# ----------------------------------------------------------------------------------------------
# the shipped checkpoint and how it was made

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
DEMO_CHECKPOINT = os.path.join(ASSETS, "maskrcnn_r18_half_shapes.pth")
# The commands behind the shipped checkpoint (benchmarks/RESULTS.md); ``--train`` runs them.
DATA_ARGS = ["--train", "1000", "--val", "200", "--size", "256", "--seed", "0"]
TRAIN_PRESET = "shapes_r18_fast_cpu"


def train_demo_checkpoint(work_dir: str, device: str = "cpu", threads: int = 2, data_args: Sequence[str] = DATA_ARGS,
                          train_args: Sequence[str] = ()) -> str:
    """Retrains the demo checkpoint from scratch with the recorded commands: generates the
    shapes data (1000 train / 200 val images of 256 px, seed 0) under ``work_dir/data``, trains
    the ``shapes_r18_fast_cpu`` preset (29 minutes of wall time on a CPU, final evaluation
    included) into ``work_dir/run``, and exports its float16 weights to
    ``work_dir/maskrcnn_r18_half_shapes.pth``, which it returns. ``data_args`` and
    ``train_args`` (appended to the training command) exist for tests."""
    data = os.path.join(work_dir, "data")
    run = os.path.join(work_dir, "run")
    py = sys.executable
    if not os.path.exists(os.path.join(data, "annotations", "instances_val.json")):
        _run([py, "-m", "instseg_ops.models.data.shapes", "--out", data] + list(data_args))
    train = [py, "-m", "instseg_ops.models.train", "--preset", TRAIN_PRESET, "--data", data, "--out", run,
             "--device", device]
    if device == "cpu":
        train += ["--threads", str(threads)]
    train += list(train_args)
    _run(train)
    dst = os.path.join(work_dir, "maskrcnn_r18_half_shapes.pth")
    export_checkpoint(os.path.join(run, "model_final.pth"), dst,
                      info={"source": " ".join(train), "final_eval": _final_eval(os.path.join(run, "metrics.jsonl"))})
    print(f"wrote {dst} (float16 weights); copy it over {DEMO_CHECKPOINT} to ship it", flush=True)
    return dst


def _run(cmd: List[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _final_eval(metrics_path: str) -> Optional[dict]:
    """The last evaluation a training run logged to its metrics.jsonl, or None."""
    last = None
    if os.path.exists(metrics_path):
        with open(metrics_path) as f:
            for line in f:
                if '"eval"' in line:
                    last = json.loads(line)
    return last


# ----------------------------------------------------------------------------------------------
# fresh images, matching to their ground truth, the picture


def pick_demo_seed(seed: Optional[int], num_images: int) -> int:
    """``seed``, or a new one when None; says which, and that these are not training images."""
    seed = seed if seed is not None else int.from_bytes(os.urandom(4), "little") % 100000
    print(f"{num_images} generated images (split 'demo', seed {seed}; the training data is split 'train', "
          f"seed 0)", flush=True)
    return seed


def demo_images(seed: int, num_images: int, size: int = 256):
    """``num_images`` synthetic shapes images of the "demo" split: [(RGB uint8 [H, W, 3],
    {"labels": int64 [N], "masks": bool [N, H, W]})]."""
    from .data.synthetic import render_sample
    out = []
    for i in range(num_images):
        image, instances = render_sample(seed, "demo", i, size=size)
        h, w = image.shape[:2]
        masks = np.stack([d["mask"] for d in instances]) if instances else np.zeros((0, h, w), dtype=bool)
        out.append((image, {"labels": np.array([d["category_id"] for d in instances], dtype=np.int64),
                            "masks": masks}))
    return out


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every mask of ``a`` [N, H, W] with every mask of ``b`` [M, H, W]: [N, M]."""
    a = a.reshape(len(a), int(np.prod(a.shape[1:]))).astype(np.float64)
    b = b.reshape(len(b), int(np.prod(b.shape[1:]))).astype(np.float64)
    inter = a @ b.T
    union = a.sum(1)[:, None] + b.sum(1)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0)


def match_detections(pred_labels, pred_scores, pred_masks, gt_labels, gt_masks, iou_thresh: float = 0.5):
    """Greedy matching, best score first, as COCO evaluation does: each detection takes the
    unmatched ground-truth object of its class with the highest mask IoU, if that IoU is at
    least ``iou_thresh``. Returns (gt_iou [M]: the matched detection's IoU, 0 when missed;
    pred_match [N]: the index of the matched object, -1 for a false positive)."""
    ious = mask_iou(np.asarray(pred_masks), np.asarray(gt_masks))
    gt_iou = np.zeros(len(gt_labels))
    pred_match = np.full(len(pred_labels), -1, dtype=np.int64)
    taken = np.zeros(len(gt_labels), dtype=bool)
    for i in np.argsort(-np.asarray(pred_scores, dtype=np.float64), kind="stable"):
        cand = np.where((np.asarray(gt_labels) == pred_labels[i]) & ~taken, ious[i], -1.0)
        if len(cand) and cand.max() >= iou_thresh:
            j = int(cand.argmax())
            taken[j], gt_iou[j], pred_match[i] = True, cand[j], j
    return gt_iou, pred_match


def _upscale(image: np.ndarray, masks: np.ndarray, factor: int):
    if factor == 1:
        return image, masks
    return (image.repeat(factor, 0).repeat(factor, 1),
            masks.repeat(factor, 1).repeat(factor, 2) if masks.size else
            np.zeros((len(masks), image.shape[0] * factor, image.shape[1] * factor), dtype=bool))


def _caption(tile: np.ndarray, text: str, height: int) -> np.ndarray:
    """``tile`` with a white strip of ``height`` pixels above it holding ``text``."""
    strip = Image.new("RGB", (tile.shape[1], height), (255, 255, 255))
    ImageDraw.Draw(strip).text((6, max(0, (height - 14) // 2)), text, fill=(0, 0, 0), font=_font(max(10, height // 2)))
    return np.concatenate([np.asarray(strip), tile], axis=0)


def _tile(rows: List[List[np.ndarray]], gap: int = 6) -> np.ndarray:
    h = max(t.shape[0] for r in rows for t in r)
    w = max(t.shape[1] for r in rows for t in r)
    cols = max(len(r) for r in rows)
    canvas = np.full((len(rows) * (h + gap) + gap, cols * (w + gap) + gap, 3), 255, dtype=np.uint8)
    for i, r in enumerate(rows):
        for j, t in enumerate(r):
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            canvas[y:y + t.shape[0], x:x + t.shape[1]] = t
    return canvas


def _predict(model, rgb: np.ndarray, device: str, score_thresh: float):
    tensor = torch.from_numpy(rgb).permute(2, 0, 1).float().div(255.0).to(device)
    pred = model([tensor])[0]
    keep = pred["scores"] >= score_thresh
    masks = pred["masks"][keep]
    if masks.dim() == 4:
        masks = masks[:, 0]
    return {"boxes": pred["boxes"][keep].cpu().numpy(), "labels": pred["labels"][keep].cpu().numpy(),
            "scores": pred["scores"][keep].cpu().numpy(), "masks": (masks > 0.5).cpu().numpy()}


def _boxes_of(masks: np.ndarray) -> np.ndarray:
    boxes = np.zeros((len(masks), 4))
    for k, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        boxes[k] = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
    return boxes


@torch.no_grad()
def run_generated_demo(out_path: str, checkpoint: Optional[str] = None, num_images: int = 3, seed: int = 0,
                       size: int = 256, score_thresh: float = 0.5, device: str = "cpu", scale: int = 2,
                       model=None, names=None) -> Dict[str, object]:
    """The default demo: ``num_images`` fresh images, ground truth beside detections, one row per
    image, written to ``out_path``. Returns the counts it prints (objects, found, false
    positives, objects whose mask was found whatever the class, mean mask IoU of the found
    objects, seconds per image)."""
    if model is None:
        model, names = load_model(checkpoint or DEMO_CHECKPOINT, device)
    names = names or {}
    rows, found, total, false_pos, ious, seconds, segmented = [], 0, 0, 0, [], 0.0, 0
    cap = 14 * scale
    for i, (image, gt) in enumerate(demo_images(seed, num_images, size)):
        t0 = time.perf_counter()
        det = _predict(model, image, device, score_thresh)
        seconds += time.perf_counter() - t0
        gt_iou, pred_match = match_detections(det["labels"], det["scores"], det["masks"], gt["labels"], gt["masks"])
        any_class, _ = match_detections(np.zeros(len(det["labels"])), det["scores"], det["masks"],
                                        np.zeros(len(gt["labels"])), gt["masks"])
        segmented += int((any_class > 0).sum())
        n_found = int((gt_iou > 0).sum())
        found, total, false_pos = found + n_found, total + len(gt_iou), false_pos + int((pred_match < 0).sum())
        ious += [float(v) for v in gt_iou[gt_iou > 0]]
        big, gt_masks = _upscale(image, gt["masks"], scale)
        _, det_masks = _upscale(image, det["masks"], scale)
        left = draw_detections(big, _boxes_of(gt_masks), gt["labels"], None, gt_masks, names)
        right = draw_detections(big, det["boxes"] * scale, det["labels"], det["scores"], det_masks, names)
        mean = f", mask IoU {gt_iou[gt_iou > 0].mean():.2f}" if n_found else ""
        rows.append([_caption(left, f"image {i}: ground truth, {len(gt_iou)} objects", cap),
                     _caption(right, f"detections >= {score_thresh}: {n_found}/{len(gt_iou)} found{mean}, "
                                     f"{int((pred_match < 0).sum())} other", cap)])
        print(f"image {i}: {len(gt_iou)} objects, {n_found} found (right class, mask IoU >= 0.5{mean}), "
              f"{int((pred_match < 0).sum())} other detections >= {score_thresh}", flush=True)
    write_image(out_path, _tile(rows))
    summary = {"images": num_images, "objects": total, "found": found, "segmented_any_class": segmented,
               "false_positives": false_pos, "seed": seed, "score_thresh": score_thresh, "out": out_path,
               "mean_mask_iou": float(np.mean(ious)) if ious else 0.0, "seconds_per_image": seconds / max(1, num_images)}
    return summary


def demo_parser(prog: str, description: str, checkpoint_help: str) -> argparse.ArgumentParser:
    """The options both demos (this one and ``sam.demo``) take: --out, --checkpoint,
    --num-images, --seed, --device, --threads, --json; see ``parse_demo_args``."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--out", required=True, help="output image (PNG; the format follows the suffix)")
    p.add_argument("--checkpoint", default=None, help=checkpoint_help)
    p.add_argument("--num-images", type=int, default=3, help="generated images (default 3)")
    p.add_argument("--seed", type=int, default=None, help="seed of the generated images (default: a new one each run)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads")
    p.add_argument("--json", default=None, help="also write the counts printed at the end to this JSON file")
    return p


def parse_demo_args(p: argparse.ArgumentParser, argv) -> argparse.Namespace:
    """``demo_parser``'s options parsed: --num-images checked, --threads applied."""
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("--num-images must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv=None):
    p = demo_parser("python -m instseg_ops.models.demo", __doc__.split("\n")[0],
                    "a checkpoint written by instseg_ops.models.train (default: the shipped shapes model)")
    p.add_argument("--image", nargs="+", default=None,
                   help="run on these images (any format Pillow reads) instead of generated ones; "
                        "with several, --out gets a _<k> suffix per image")
    p.add_argument("--size", type=int, default=256, help="generated image size (the model trained on 256 px)")
    p.add_argument("--score-thresh", type=float, default=0.5)
    p.add_argument("--min-shown", type=int, default=0,
                   help="with --image: draw at least this many detections (the best ones) even below --score-thresh")
    p.add_argument("--train", action="store_true",
                   help="first retrain the checkpoint from scratch with the recorded commands (about 30 minutes "
                        "on a CPU), then draw with it")
    p.add_argument("--train-dir", default="demo_train", help="with --train: data, run and exported checkpoint")
    args = parse_demo_args(p, argv)
    checkpoint = args.checkpoint
    if args.train:
        if checkpoint:
            p.error("--train makes its own checkpoint; leave out --checkpoint")
        checkpoint = train_demo_checkpoint(args.train_dir, args.device, args.threads or 2)
    checkpoint = checkpoint or DEMO_CHECKPOINT
    if not os.path.exists(checkpoint):
        sys.exit(f"checkpoint {checkpoint} not found")
    t0 = time.perf_counter()
    model, names = load_model(checkpoint, args.device)
    print(f"model: {checkpoint} (loaded in {time.perf_counter() - t0:.1f} s)", flush=True)
    if args.image:
        for k, path in enumerate(args.image):
            out = args.out
            if len(args.image) > 1:
                stem, ext = os.path.splitext(args.out)
                out = f"{stem}_{k}{ext or '.png'}"
            det = run_demo(checkpoint, path, out, args.score_thresh, args.device, model=model, names=names,
                           min_shown=args.min_shown)
            for box, label, name, score in zip(det["boxes"], det["labels"], det["names"], det["scores"]):
                print(f"  {name} (label {int(label)}) score {float(score):.3f} box {[round(float(v), 1) for v in box]}")
            above = int((det["scores"] >= args.score_thresh).sum())
            extra = f", and the {len(det['scores']) - above} best below it" if len(det["scores"]) > above else ""
            print(f"{path}: {above} detections >= {args.score_thresh}{extra}; wrote {out}")
        return
    seed = pick_demo_seed(args.seed, args.num_images)
    s = run_generated_demo(args.out, num_images=args.num_images, seed=seed, size=args.size,
                           score_thresh=args.score_thresh, device=args.device, model=model, names=names)
    s["checkpoint"] = checkpoint
    print(f"found {s['found']}/{s['objects']} objects (right class, mask IoU >= 0.5; mean mask IoU "
          f"{s['mean_mask_iou']:.2f}; {s['segmented_any_class']}/{s['objects']} masks found whatever the class), "
          f"{s['false_positives']} other detections, {s['seconds_per_image']:.2f} s per image on {args.device}; "
          f"wrote {args.out}")
    write_json(s, args.json)


if __name__ == "__main__":
    main(sys.argv[1:])
