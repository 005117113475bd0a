"""CPU (or CUDA) inference time of CenterMask-Lite V-19 against the Mask R-CNN R-18 preset
model at the same image size, per stage.

Models (random weights, seed 0, 7 classes as the shapes data): ``centermask_lite_v19``
(VoVNetV2-19 with frozen BN, FPN 128 on P3-P7, FCOS with 2+2 tower convs, SAG-Mask and MaskIoU
heads of 2 x 128) and ``maskrcnn_r18_half_shapes`` (the ``shapes_r18_fast_cpu`` preset's
half-width ResNet-18-FPN, GroupNorm), both resizing images to ``--size`` (short and long side).
Random weights score nothing above the usual thresholds, so both keep every candidate (score
thresholds 0) and emit ``--detections`` per image (FCOS post-NMS top-k; Mask R-CNN detections per
image): the mask stages then see the same number of boxes.

Stages (median over --repeats of a manual pass through each model's own modules):
CenterMask ``backbone`` (transform, VoVNet, FPN P3-P7), ``detector`` (FCOS head, decoding,
NMS), ``mask`` (scale-adaptive RoIAlign, SAG-Mask, MaskIoU), ``paste``; Mask R-CNN
``backbone``, ``detector`` (RPN and the box stage with its NMS), ``mask``, ``paste``. ``total``
is the median of ``model(images)`` calls.

Run (from the repo root):
    python benchmarks/bench_models_centermask.py --quick       # 1 image 512 px, 3 repeats
    python benchmarks/bench_models_centermask.py               # 2 images 512 px, 5 repeats
Results go to --out (default benchmarks/out/models_centermask_<device>.json).
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
from instseg_ops.models import get_model  # noqa: E402

STAGES = ["backbone", "detector", "mask", "paste", "total"]
COLUMNS = [("device", 6), ("stage", 9), ("centermask_ms", 13), ("maskrcnn_ms", 12), ("ratio", 7)]


def build(device, args):
    torch.manual_seed(0)
    size = dict(min_size=args.size, max_size=args.size, num_classes=7)
    cm = get_model("centermask_lite_v19", score_thresh=0.0, post_nms_top_k_test=args.detections, **size)
    mr = get_model("maskrcnn_r18_half_shapes", box_score_thresh=0.0, box_detections_per_img=args.detections, **size)
    return cm.eval().to(device), mr.eval().to(device)


def stages_centermask(m, imgs, device):
    from instseg_ops.models.detection.boxes import clip_boxes, keep_min_size
    clock = StageClock(device)
    orig = [tuple(i.shape[-2:]) for i in imgs]
    batch, sizes, _ = m.transform(imgs)
    feats = m.backbone(batch)
    clock.mark("backbone")
    dets, _ = m.fcos(feats)
    res = []
    for d, s in zip(dets, sizes):
        keep = keep_min_size(clip_boxes(d["boxes"], s), 1e-2)
        res.append({"boxes": d["boxes"][keep], "labels": d["classes"][keep] + 1, "scores": d["scores"][keep]})
    clock.mark("detector")
    res = m.roi_heads.inference(feats, res, sizes)
    clock.mark("mask")
    out = m.transform.postprocess(res, sizes, orig)
    clock.mark("paste")
    return clock.ms, out


def stages_maskrcnn(m, imgs, device):
    return maskrcnn_stages(m, imgs, device, split_detector=False)


def run_device(device, args, rows):
    cm, mr = build(device, args)
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, args.size, args.size, generator=g).to(device) for _ in range(args.images)]
    with torch.no_grad():
        _, o1 = stages_centermask(cm, imgs, device)
        _, o2 = stages_maskrcnn(mr, imgs, device)
        counts = {"centermask": [len(o["boxes"]) for o in o1], "maskrcnn": [len(o["boxes"]) for o in o2]}
        base.note(f"{device}: detections per image: CenterMask-Lite {counts['centermask']}, "
                  f"Mask R-CNN {counts['maskrcnn']}")
        per = time_models([("cm", stages_centermask, cm), ("mr", stages_maskrcnn, mr)], imgs, device, args.repeats,
                          STAGES, desc=f"{device}: repeats (CenterMask, Mask R-CNN)")
    params = {"centermask": sum(p.numel() for p in cm.parameters()) + sum(b.numel() for b in cm.buffers()),
              "maskrcnn": sum(p.numel() for p in mr.parameters()) + sum(b.numel() for b in mr.buffers())}
    for s in STAGES:
        a, b = statistics.median(per["cm"][s]), statistics.median(per["mr"][s])
        row = {"device": device, "stage": s, "centermask_ms": a, "maskrcnn_ms": b, "ratio": a / b if b else None,
               "centermask_samples_ms": per["cm"][s], "maskrcnn_samples_ms": per["mr"][s], "images": args.images,
               "size": args.size, "repeats": args.repeats, "detections": counts, "parameters_and_buffers": params}
        rows.append(row)
        cells = [device, s, base.fmt(a, ".1f"), base.fmt(b, ".1f"), base.fmt(row["ratio"], ".2f") + "x"]
        print("  ".join(c.rjust(wd) for c, (_, wd) in zip(cells, COLUMNS)), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None)
    add_run_args(p, images=2)
    p.add_argument("--size", type=int, default=512, help="square image side, also both models' resize size")
    p.add_argument("--detections", type=int, default=50, help="detections per image for both models")
    return finish_args(p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    cuda_ok = torch.cuda.is_available() and instseg_ops.cuda_built()
    devices = base.devices_for(args.device, cuda_ok)
    out = args.out or os.path.join("benchmarks", "out", f"models_centermask_{'_'.join(devices)}.json")
    base.run_all(dict(base.common_meta(devices), seed=0), COLUMNS, devices, run_device, args, out)


if __name__ == "__main__":
    main()
