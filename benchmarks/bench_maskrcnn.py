"""End-to-end Mask R-CNN inference: instseg_ops.models vs torchvision, same weights and inputs.

Both models are torchvision's ``maskrcnn_resnet50_fpn`` architecture with the same random
weights (seed 0; torchvision's model built without downloads, its state_dict loaded into ours
with strict=True). The box classifier's weights are multiplied by 4 in both so that random
weights yield confident, varied detections (100 per image, as with trained weights) instead
of near-uniform scores. Images: uniform random pixels, --images of them at --size (H, W),
resized by both transforms to the 800 / 1333 defaults (the default 800x1216 is COCO-like and
kept as it is).

Per stage (median over --repeats of a manual pass through each model's own modules):
``backbone`` (transform + ResNet-50-FPN), ``rpn`` (head, anchors, decoding, top-k, NMS),
``box`` (multi-scale RoIAlign 7x7, box head, postprocessing incl. class-wise NMS), ``mask``
(RoIAlign 14x14 of the detections, mask head), ``paste`` (boxes back to image size, masks
pasted). ``total`` is the median of ``model(images)`` calls, timed separately. Ratios are
torchvision / ours. Agreement: per image, the number of detections, the fraction of ours that
match a torchvision detection (same label, box IoU > 0.99) and the largest score difference
over the matched pairs are printed.

Run (from the repo root):
    python benchmarks/bench_maskrcnn.py --quick     # 1 image 800x1216, 3 repeats (~2 min on 2 cores)
    python benchmarks/bench_maskrcnn.py             # 2 images 800x1216, 5 repeats (+CUDA if present)
Results go to --out (default benchmarks/out/maskrcnn_<device>.json). Both models run as
built by default: ours batches CPU images channels_last (its default), torchvision's runs in
the standard layout; --ours-layout and --tv-channels-last compare like with like.
"""
import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_roi_align as base  # noqa: E402  device selection, metadata, formatting
from model_stages import StageClock, add_run_args, finish_args, maskrcnn_stages, time_models  # noqa: E402

import instseg_ops  # noqa: E402
from instseg_ops.models import maskrcnn_resnet50_fpn  # noqa: E402
from instseg_ops.models.detection.boxes import box_iou  # noqa: E402

try:
    import torchvision
except Exception:  # optional peer
    torchvision = None

STAGES = ["backbone", "rpn", "box", "mask", "paste", "total"]
COLUMNS = [("device", 6), ("stage", 9), ("ours_ms", 9), ("tv_ms", 9), ("speedup", 8)]


def build(device, args):
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(4)
    ours = maskrcnn_resnet50_fpn(channels_last={"auto": None, "channels_last": True,
                                                "contiguous": False}[args.ours_layout])
    ours.load_state_dict(tv.state_dict(), strict=True)
    tv = tv.eval().to(device)
    if args.tv_channels_last:
        tv = tv.to(memory_format=torch.channels_last)
    return ours.eval().to(device), tv


def attach_masks(dets, mask_logits):
    """Each detection's mask probabilities (its own class's logits), as both models' eval does."""
    labels = torch.cat([d["labels"] for d in dets])
    probs = mask_logits.sigmoid()[torch.arange(len(labels), device=labels.device), labels][:, None]
    for d, p in zip(dets, probs.split([len(d["boxes"]) for d in dets])):
        d["masks"] = p


def stages_ours(m, imgs, device):
    return maskrcnn_stages(m, imgs, device, split_detector=True)


def stages_tv(m, imgs, device):
    rh = m.roi_heads
    clock = StageClock(device)
    orig = [tuple(i.shape[-2:]) for i in imgs]
    il, _ = m.transform(imgs)
    feats = m.backbone(il.tensors)
    clock.mark("backbone")
    props, _ = m.rpn(il, feats)
    clock.mark("rpn")
    logits, deltas = rh.box_predictor(rh.box_head(rh.box_roi_pool(feats, props, il.image_sizes)))
    boxes, scores, labels = rh.postprocess_detections(logits, deltas, props, il.image_sizes)
    dets = [{"boxes": b, "scores": s, "labels": lab} for b, s, lab in zip(boxes, scores, labels)]
    clock.mark("box")
    attach_masks(dets, rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(feats, boxes, il.image_sizes))))
    clock.mark("mask")
    out = m.transform.postprocess(dets, il.image_sizes, orig)
    clock.mark("paste")
    return clock.ms, out


def agreement(o, w):
    """Fraction of our detections with a torchvision detection of the same label and box IoU
    > 0.99, and the largest score difference over those pairs. (Saturated scores tie, and
    tied detections may come in another order, so detections are matched, not compared by rank.)"""
    if len(o["boxes"]) == 0 or len(w["boxes"]) == 0:
        return float(len(o["boxes"]) == len(w["boxes"])), 0.0
    iou = box_iou(o["boxes"], w["boxes"])
    iou[o["labels"][:, None] != w["labels"][None, :]] = 0
    best, idx = iou.max(dim=1)
    m = best > 0.99
    diff = (o["scores"][m] - w["scores"][idx[m]]).abs().max().item() if m.any() else float("nan")
    return m.float().mean().item(), diff


def run_device(device, args, rows):
    ours, tv = build(device, args)
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, args.size[0], args.size[1], generator=g).to(device) for _ in range(args.images)]
    with torch.no_grad():
        _, out_ours = stages_ours(ours, imgs, device)  # warm-up and agreement
        _, out_tv = stages_tv(tv, imgs, device)
        agree = []
        for o, w in zip(out_ours, out_tv):
            frac, score_diff = agreement(o, w)
            agree.append({"ours": len(o["boxes"]), "torchvision": len(w["boxes"]), "match_fraction": frac,
                          "max_score_diff": score_diff})
            base.note(f"{device}: detections ours {len(o['boxes'])}, torchvision {len(w['boxes'])}; "
                      f"{frac:.1%} of ours match one of torchvision's (same label, box IoU > 0.99), "
                      f"max |score diff| {score_diff:.1e}")
        per = time_models([("ours", stages_ours, ours), ("tv", stages_tv, tv)], imgs, device, args.repeats, STAGES,
                          desc=f"{device}: repeats (ours, torchvision)")
    for s in STAGES:
        o, w = statistics.median(per["ours"][s]), statistics.median(per["tv"][s])
        row = {"device": device, "stage": s, "ours_ms": o, "tv_ms": w, "speedup": w / o if o else None,
               "ours_min_ms": min(per["ours"][s]), "tv_min_ms": min(per["tv"][s]),
               "ours_samples_ms": per["ours"][s], "tv_samples_ms": per["tv"][s],
               "images": args.images, "size": args.size, "repeats": args.repeats, "agreement": agree,
               "ours_layout": args.ours_layout, "tv_channels_last": args.tv_channels_last}
        rows.append(row)
        cells = [device, s, base.fmt(o, ".1f"), base.fmt(w, ".1f"), base.fmt(row["speedup"], ".2f") + "x"]
        print("  ".join(c.rjust(wd) for c, (_, wd) in zip(cells, COLUMNS)), flush=True)
    post_o = sum(statistics.median(per["ours"][s]) for s in ("rpn", "box", "mask", "paste"))
    post_t = sum(statistics.median(per["tv"][s]) for s in ("rpn", "box", "mask", "paste"))
    post_samples = {name: [sum(per[name][s][i] for s in ("rpn", "box", "mask", "paste")) for i in range(args.repeats)]
                    for name in ("ours", "tv")}
    rows.append({"device": device, "stage": "post_backbone", "ours_ms": post_o, "tv_ms": post_t,
                 "speedup": post_t / post_o, "ours_samples_ms": post_samples["ours"],
                 "tv_samples_ms": post_samples["tv"]})
    print("  ".join(c.rjust(wd) for c, (_, wd) in zip(
        [device, "post-bb", f"{post_o:.1f}", f"{post_t:.1f}", f"{post_t / post_o:.2f}x"], COLUMNS)), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None)
    add_run_args(p, images=2)
    p.add_argument("--size", type=lambda s: [int(v) for v in s.split("x")], default=[800, 1216], help="HxW")
    p.add_argument("--ours-layout", choices=["auto", "channels_last", "contiguous"], default="auto",
                   help="memory format of our batched images (auto: channels_last on the CPU, our default)")
    p.add_argument("--tv-channels-last", action="store_true",
                   help="give torchvision's model channels_last weights (its convolutions then run channels_last)")
    return finish_args(p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    if torchvision is None:
        sys.exit("bench_maskrcnn needs torchvision (the peer) installed")
    cuda_ok = torch.cuda.is_available() and instseg_ops.cuda_built()
    devices = base.devices_for(args.device, cuda_ok)
    out = args.out or os.path.join("benchmarks", "out", f"maskrcnn_{'_'.join(devices)}.json")
    base.run_all(dict(base.common_meta(devices), seed=0), COLUMNS, devices, run_device, args, out)


if __name__ == "__main__":
    main()
