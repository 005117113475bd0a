"""Prompted evaluation of SAM on a COCO-format instance segmentation set.

    python -m instseg_ops.models.sam.evaluate --checkpoint RUN_DIR/model_final.pth --data DIR \\
        [--split val] [--arch NAME] [--max-images N] [--device cpu|cuda] [--threads T] [--json F]

Every ground-truth instance (non-empty mask) is prompted twice on its image's embedding:

- ``box_mIoU``: by its ground-truth box, the single-mask output (``multimask_output=False``)
  upsampled to the original image size and thresholded at the model's ``mask_threshold``;
- ``point_mIoU``: by one positive point inside it (the maximum of the mask's Euclidean
  distance transform, the image's outside counted as background), the three multimask
  outputs, of which the one with the highest predicted IoU is scored (segment-anything's use
  of a single click); ``point_oracle_mIoU`` scores the best of the three.

Each is the mean IoU with the ground-truth mask over all instances (``_small`` / ``_medium``
/ ``_large``: COCO's mask-area ranges, below 32^2, below 96^2, above), as ``metrics.jsonl``'s
evaluation records of the ``shapes_sam_tiny_cpu`` preset hold them. ``--checkpoint`` is a
checkpoint written by the trainer, or any SAM state dict (the official one, transformers') with
``--arch`` naming the registered model to load it into (e.g. ``sam_vit_b``). The generic
``python -m instseg_ops.models.evaluate`` gives the same numbers for a trainer checkpoint.
"""
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor

from ..engine.distributed import DistInfo, all_gather_objects
from .training import prepare_images

AREA_RANGES = (("small", 0, 32 ** 2), ("medium", 32 ** 2, 96 ** 2), ("large", 96 ** 2, float("inf")))


def interior_points(masks: Tensor) -> Tensor:
    """(N, H, W) masks -> (N, 2) float XY pixel indices: per mask the pixel farthest from the
    background (the maximum of ``scipy.ndimage.distance_transform_edt`` with the outside of
    the image counted as background; ties: the first in row-major order). An empty mask gets
    (-1, -1)."""
    from scipy import ndimage
    out = []
    for m in masks.detach().cpu().numpy().astype(bool):
        if not m.any():
            out.append((-1.0, -1.0))
            continue
        dist = ndimage.distance_transform_edt(np.pad(m, 1))[1:-1, 1:-1]
        y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out.append((float(x), float(y)))
    return torch.tensor(out, dtype=torch.float32).reshape(-1, 2)


def mask_iou(pred: Tensor, gt: Tensor) -> Tensor:
    """IoU of boolean masks over the last two dims (broadcast); 1 where both are empty."""
    inter = (pred & gt).flatten(-2).sum(-1).double()
    union = (pred | gt).flatten(-2).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


@torch.no_grad()
def prompt_ious(model, images: List[Tensor], targets: List[Dict[str, Tensor]], chunk: int = 16
                ) -> List[Dict[str, Tensor]]:
    """Per image, per non-empty ground-truth mask: ``box``, ``point``, ``point_oracle`` IoUs
    (float64) and the mask ``area`` (see the module's description). ``images``: (3, H, W)
    floats in [0, 1] or [0, 255]; ``targets``: ``masks`` (N, H, W), ``boxes`` (N, 4) XYXY.
    Prompts go through the decoder ``chunk`` at a time."""
    x, sizes = prepare_images(model, images)
    emb = model.image_encoder(x)
    pe = model.prompt_encoder.get_dense_pe()
    dev, thr = model.device, model.mask_threshold
    out = []
    for i, (img, tgt) in enumerate(zip(images, targets)):
        h, w = img.shape[-2:]
        nh, nw = sizes[i]
        gt = tgt["masks"].to(dev).bool()
        keep = gt.flatten(1).any(1)
        gt, boxes = gt[keep], tgt["boxes"].to(dev).float()[keep]
        scale = torch.tensor([nw / w, nh / h], device=dev)
        points = interior_points(gt).to(dev) * scale
        res = {k: [] for k in ("box", "point", "point_oracle")}
        for lo in range(0, len(gt), chunk):
            g = gt[lo:lo + chunk]
            n = len(g)
            sparse, dense = model.prompt_encoder(None, boxes[lo:lo + chunk] * scale.repeat(2), None)
            logits, _ = model.mask_decoder(emb[i:i + 1], pe, sparse, dense, multimask_output=False)
            pred = model.postprocess_masks(logits, (nh, nw), (h, w)) > thr
            res["box"].append(mask_iou(pred[:, 0], g))
            labels = torch.ones(n, 1, dtype=torch.long, device=dev)
            sparse, dense = model.prompt_encoder((points[lo:lo + chunk, None], labels), None, None)
            logits, iou_pred = model.mask_decoder(emb[i:i + 1], pe, sparse, dense, multimask_output=True)
            pred = model.postprocess_masks(logits, (nh, nw), (h, w)) > thr
            ious = mask_iou(pred, g[:, None])
            res["point"].append(ious[torch.arange(n, device=dev), iou_pred.argmax(1)])
            res["point_oracle"].append(ious.max(1).values)
        rec = {k: torch.cat(v).cpu() if v else torch.zeros(0, dtype=torch.float64) for k, v in res.items()}
        rec["area"] = gt.flatten(1).sum(1).cpu()
        out.append(rec)
    return out


def summarize(records: List[Dict[str, Tensor]], images: int) -> Dict[str, Any]:
    """Mean IoUs over all instances of ``records`` (``prompt_ious``' dicts)."""
    cat = {k: torch.cat([r[k] for r in records]) if records else torch.zeros(0) for k in
           ("box", "point", "point_oracle", "area")}
    n = len(cat["box"])
    result: Dict[str, Any] = {}
    for key in ("box", "point", "point_oracle"):
        result[f"{key}_mIoU"] = float(cat[key].mean()) if n else 0.0
    counts = {"images": images, "instances": n}
    for name, a, b in AREA_RANGES:
        sel = (cat["area"] >= a) & (cat["area"] < b)
        counts[name] = int(sel.sum())
        if sel.any():
            result[f"box_mIoU_{name}"] = float(cat["box"][sel].mean())
    result["counts"] = counts
    return result


@torch.no_grad()
def evaluate_prompts(model, dataset, info: Optional[DistInfo] = None, max_images: int = 0, batch_size: int = 4,
                     progress: bool = False) -> Optional[Dict[str, Any]]:
    """Box- and point-prompt mIoU of ``model`` (a ``Sam``) on ``dataset`` (``(image, target)``
    items as ``CocoInstanceDataset``'s; its first ``max_images`` if > 0). Under torchrun
    (``info``) every rank takes its shard and rank 0 merges; returns the result on rank 0,
    None on the others. The model's train/eval mode is restored."""
    if info is None:
        info = DistInfo(device=str(model.device))
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    indices = list(range(info.rank, n, info.world_size))
    was_training = model.training
    model.eval()
    bar = None
    if progress and info.is_main and sys.stderr.isatty():
        from tqdm import tqdm
        bar = tqdm(total=len(indices), desc="evaluate", unit="img", leave=False)
    records = []
    try:
        for lo in range(0, len(indices), batch_size):
            samples = [dataset[i] for i in indices[lo:lo + batch_size]]
            records += prompt_ious(model, [s[0] for s in samples], [s[1] for s in samples])
            if bar is not None:
                bar.update(len(samples))
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    gathered = all_gather_objects(records, info)
    if not info.is_main:
        return None
    return summarize([r for part in gathered for r in part], n)


def load_model(checkpoint: str, arch: Optional[str], device: str):
    """A trainer checkpoint (its preset's model) or, with ``arch``, any SAM state dict."""
    from ..engine.checkpoint import load_checkpoint, model_from_checkpoint
    ckpt = load_checkpoint(checkpoint)
    if isinstance(ckpt, dict) and "preset" in ckpt and arch is None:
        return model_from_checkpoint(checkpoint, device)[0]
    if arch is None:
        raise ValueError(f"{checkpoint} was not written by the trainer; name the model to load it into with --arch "
                         "(e.g. sam_vit_b)")
    from ..registry import get_model
    from ..weights import load_pretrained
    model = get_model(arch)
    load_pretrained(model, ckpt)
    return model.to(device).eval()


def main(argv=None) -> Optional[Dict[str, Any]]:
    from ..engine.distributed import setup_distributed
    from ..evaluate import evaluation_parser, load_split, write_json
    p = evaluation_parser("python -m instseg_ops.models.sam.evaluate",
                          "Box- and point-prompt mIoU of a SAM checkpoint on a COCO-format set",
                          "trainer checkpoint, or a SAM state dict with --arch")
    p.add_argument("--arch", help="registered model for a plain state dict (e.g. sam_vit_b, sam_tiny_shapes)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = setup_distributed(args.device)
    model = load_model(args.checkpoint, args.arch, str(info.device))
    result = evaluate_prompts(model, load_split(args.data, args.split), info, max_images=args.max_images,
                              progress=True)
    if result is not None:
        print(", ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float)) + f"; {result['counts']}")
        write_json(result, args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
