"""The cascade's mechanism, measured: how well each stage's input boxes fit the ground truth.

For each image, the test-time RPN proposals go through the stages (``CascadeRoIHeads.
stage_outputs``); every RoI's best IoU with the image's ground truth is taken at each stage's
input and after the last stage's regression ("output"). Reported per stage, over the RoIs that
are foreground there (best IoU >= ``fg_iou``, 0.5): their number, mean IoU and the fraction
above 0.7; and over one fixed set, the RoIs foreground at stage 0's input, followed through
the stages ("tracked"). Crowd annotations are left out of the ground truth.

    python -m instseg_ops.models.cascade_rcnn --stage-iou RUN/model_final.pth --data DIR [--max-images N]
"""
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..detection.boxes import box_iou


@torch.no_grad()
def best_ious_per_stage(model, images: List[Tensor], targets: List[Dict[str, Tensor]]) -> List[Tensor]:
    """For a batch: one tensor per stage input (then one for the last stage's output) of every
    RoI's best IoU with its image's ground truth (0 without ground truth), all images' RoIs
    concatenated, in the same order at every stage. ``model`` is a ``CascadeMaskRCNN`` (in
    any mode; it is run as in evaluation)."""
    from .model import CascadeMaskRCNN
    if not isinstance(model, CascadeMaskRCNN):
        raise TypeError(f"best_ious_per_stage needs a CascadeMaskRCNN, got {type(model).__name__}")
    was_training = model.training
    model.eval()
    try:
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
        batch, sizes, targets = model.transform(images, targets)
        features = model.backbone(batch)
        proposals, _ = model.rpn(tuple(batch.shape[-2:]), sizes, features)
        rh = model.roi_heads
        boxes, _, deltas = rh.stage_outputs(features, proposals, sizes)
        boxes.append(rh.refine(rh.stages[-1], deltas[-1], boxes[-1], sizes))
    finally:
        model.train(was_training)
    out = []
    for per_image in boxes:
        ious = []
        for b, t in zip(per_image, targets):
            g = t["boxes"].to(b.dtype)
            ious.append(box_iou(g, b).max(dim=0).values if g.numel() and b.numel() else b.new_zeros(b.shape[0]))
        out.append(torch.cat(ious))
    return out


def summarize(ious: List[Tensor], fg_iou: float = 0.5, high_iou: float = 0.7) -> List[Dict[str, float]]:
    """One row per stage input (and the output) from ``best_ious_per_stage``'s tensors (all
    images concatenated)."""
    tracked = ious[0] >= fg_iou
    rows = []
    for k, iou in enumerate(ious):
        fg = iou >= fg_iou
        t = iou[tracked]
        rows.append({
            "stage": "output" if k == len(ious) - 1 else f"stage{k}_input",
            "foreground": int(fg.sum()),
            "mean_iou": float(iou[fg].mean()) if fg.any() else float("nan"),
            f"frac_above_{high_iou}": float((iou[fg] > high_iou).float().mean()) if fg.any() else float("nan"),
            "tracked": int(tracked.sum()),
            "tracked_mean_iou": float(t.mean()) if t.numel() else float("nan"),
            f"tracked_frac_above_{high_iou}": float((t > high_iou).float().mean()) if t.numel() else float("nan"),
        })
    return rows


def stage_input_ious(model, dataset, max_images: int = 0, fg_iou: float = 0.5, high_iou: float = 0.7,
                     device: Optional[str] = None) -> List[Dict[str, float]]:
    """``summarize`` over ``dataset`` (``(image, target)`` pairs, e.g. ``CocoInstanceDataset``;
    its first ``max_images`` if > 0), one image at a time."""
    device = device or next(model.parameters()).device
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    per_stage: List[List[Tensor]] = []
    for i in range(n):
        image, target = dataset[i]
        keep = target["iscrowd"] == 0 if "iscrowd" in target else slice(None)
        target = {"boxes": target["boxes"][keep].to(device), "labels": target["labels"][keep].to(device)}
        ious = best_ious_per_stage(model, [image.to(device)], [target])
        per_stage = [[x] for x in ious] if not per_stage else [p + [x] for p, x in zip(per_stage, ious)]
    return summarize([torch.cat(p).cpu() for p in per_stage], fg_iou, high_iou)


def format_rows(rows: List[Dict[str, float]]) -> str:
    keys = list(rows[0])
    lines = ["  ".join(f"{k:>22}" for k in keys)]
    for r in rows:
        lines.append("  ".join(f"{v:>22.4f}" if isinstance(v, float) else f"{v!s:>22}" for v in r.values()))
    return "\n".join(lines)


def run_cli(checkpoint: str, data_dir: str, split: str = "val", max_images: int = 0,
            device: Optional[str] = None) -> Tuple[List[Dict[str, float]], str]:
    import os

    from ..data import CocoInstanceDataset
    from ..engine.checkpoint import model_from_checkpoint
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, _, _ = model_from_checkpoint(checkpoint, device)
    dataset = CocoInstanceDataset(os.path.join(data_dir, split),
                                  os.path.join(data_dir, "annotations", f"instances_{split}.json"))
    rows = stage_input_ious(model, dataset, max_images, device=device)
    return rows, format_rows(rows)
