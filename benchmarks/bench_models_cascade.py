"""Second-stage inference time: Cascade Mask R-CNN's three box stages against Mask R-CNN's one,
in the same run, on the same features and proposals.

Models (``--model``): ``r50`` (default): ``maskrcnn_resnet50_fpn`` and
``cascade_maskrcnn_resnet50_fpn`` at 800 x 1216 (1000 proposals per image); ``shapes``:
``maskrcnn_r18_half_shapes`` and ``cascade_maskrcnn_r18_half_shapes`` at 256 x 256 (300
proposals), the CPU training presets' models. Random weights (seed 0); the cascade takes Mask
R-CNN's backbone and RPN (``load_pretrained``), so both see the same proposals, and, so that
both make comparable numbers of detections, every cascade stage takes Mask R-CNN's box head
(fc6, fc7), classifier and class 1's box regression; the classifiers are multiplied by 4 in
both (confident detections, as with trained weights). The backbone and RPN run once.

Timed (median and minimum of --repeats, interleaved, the order alternating): ``box``: the box stage(s) and the detection
postprocessing (``RoIHeads._forward_box``, ``CascadeRoIHeads._forward_box``); ``mask``: the
mask stage on those detections (``forward_with_given_boxes``); ``second``: both. Ratios are
cascade / Mask R-CNN.

    python benchmarks/bench_models_cascade.py --quick    # 1 image, 3 repeats
    python benchmarks/bench_models_cascade.py --model shapes --images 4
Results go to --out (default benchmarks/out/cascade_<model>_cpu.json).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_roi_align as base  # noqa: E402  metadata, formatting
from model_stages import add_run_args, finish_args  # noqa: E402

from instseg_ops.models import get_model, load_pretrained  # noqa: E402

MODELS = {"r50": ("maskrcnn_resnet50_fpn", "cascade_maskrcnn_resnet50_fpn", [800, 1216]),
          "shapes": ("maskrcnn_r18_half_shapes", "cascade_maskrcnn_r18_half_shapes", [256, 256])}
COLUMNS = [("model", 7), ("part", 7), ("maskrcnn_ms", 12), ("cascade_ms", 11), ("ratio", 7), ("dets_m", 7),
           ("dets_c", 7)]


def build(args):
    mask_name, cascade_name, _ = MODELS[args.model]
    torch.manual_seed(0)
    mask = get_model(mask_name).eval()
    cascade = get_model(cascade_name).eval()
    load_pretrained(cascade, mask.state_dict(), strict=False)
    rh, ch = mask.roi_heads, cascade.roi_heads
    with torch.no_grad():
        rh.box_predictor.cls_score.weight.mul_(4)
        for head, pred in zip(ch.box_head, ch.box_predictor):
            head.load_state_dict(rh.box_head.state_dict())
            pred.cls_score.load_state_dict(rh.box_predictor.cls_score.state_dict())
            pred.bbox_pred.weight.copy_(rh.box_predictor.bbox_pred.weight[4:8])
            pred.bbox_pred.bias.copy_(rh.box_predictor.bbox_pred.bias[4:8])
        ch.mask_head.load_state_dict(rh.mask_head.state_dict())
        ch.mask_predictor.load_state_dict(rh.mask_predictor.state_dict())
    return mask, cascade


def second_stage(heads, feats, props, sizes):
    t0 = time.perf_counter()
    dets, _ = heads._forward_box(feats, props, sizes, None)
    t1 = time.perf_counter()
    dets = heads.forward_with_given_boxes(feats, dets, sizes)
    t2 = time.perf_counter()
    return {"box": (t1 - t0) * 1e3, "mask": (t2 - t1) * 1e3, "second": (t2 - t0) * 1e3}, dets


def run(args):
    mask, cascade = build(args)
    size = args.size or MODELS[args.model][2]
    g = torch.Generator().manual_seed(1)
    imgs = [torch.rand(3, size[0], size[1], generator=g) for _ in range(args.images)]
    rows = []
    with torch.no_grad():
        batch, sizes, _ = mask.transform(imgs)
        feats = mask.backbone(batch)
        props, _ = mask.rpn(tuple(batch.shape[-2:]), sizes, feats)
        per = {"maskrcnn": {}, "cascade": {}}
        dets = {}
        for name, m in (("maskrcnn", mask), ("cascade", cascade)):  # warm-up
            _, dets[name] = second_stage(m.roi_heads, feats, props, sizes)
        pair = [("maskrcnn", mask), ("cascade", cascade)]
        for r in range(args.repeats):
            for name, m in pair[::1 if r % 2 == 0 else -1]:  # alternating order
                t, _ = second_stage(m.roi_heads, feats, props, sizes)
                for k, v in t.items():
                    per[name].setdefault(k, []).append(v)
    nd = {k: sum(len(d["boxes"]) for d in v) for k, v in dets.items()}
    base.note(f"proposals per image {[len(p) for p in props]}; detections Mask R-CNN {nd['maskrcnn']}, "
              f"cascade {nd['cascade']}")
    for part in ("box", "mask", "second"):
        m, c = statistics.median(per["maskrcnn"][part]), statistics.median(per["cascade"][part])
        row = {"model": args.model, "part": part, "maskrcnn_ms": m, "cascade_ms": c, "ratio": c / m,
               "maskrcnn_min_ms": min(per["maskrcnn"][part]), "cascade_min_ms": min(per["cascade"][part]),
               "detections_maskrcnn": nd["maskrcnn"], "detections_cascade": nd["cascade"],
               "proposals": [len(p) for p in props], "images": args.images, "size": size, "repeats": args.repeats,
               "maskrcnn_samples_ms": per["maskrcnn"][part], "cascade_samples_ms": per["cascade"][part]}
        rows.append(row)
        cells = [args.model, part, base.fmt(m, ".1f"), base.fmt(c, ".1f"), base.fmt(c / m, ".2f") + "x",
                 str(nd["maskrcnn"]), str(nd["cascade"])]
        print("  ".join(x.rjust(w) for x, (_, w) in zip(cells, COLUMNS)), flush=True)
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(MODELS), default="r50")
    add_run_args(p, images=1)
    p.add_argument("--size", type=lambda s: [int(v) for v in s.split("x")], default=None, help="HxW")
    p.add_argument("--threads", type=int, default=None)
    return finish_args(p.parse_args(argv))


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = args.out or os.path.join("benchmarks", "out", f"cascade_{args.model}_cpu.json")

    def run_device(device, args, rows):
        rows.extend(run(args))

    base.run_all(dict(base.common_meta(["cpu"]), seed=0), COLUMNS, ["cpu"], run_device, args, out)


if __name__ == "__main__":
    main()
