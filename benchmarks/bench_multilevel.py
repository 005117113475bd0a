"""Benchmark ``instseg_ops.MultiScaleRoIAlign`` against ``torchvision.ops.MultiScaleRoIAlign`` in the same run.

What it measures: one call of Mask R-CNN's multi-level RoI pooler, module in, module out.
Features are those of 2 images of 800x1216, C=256, on the FPN levels P2-P5 (strides 4, 8,
16, 32, i.e. 200x304, 100x152, 50x76, 25x38), passed as a dict {"p2": ..., "p5": ...}.
Boxes are a list of two Tensor[1000, 4] (1000 RoIs per image; sizes log-uniform in
[16, 800] px, aspect ratios in [0.5, 2], centres uniform in the image, clipped to it,
fixed seed; the RoIs of bench_roi_align.py with 2000 RoIs). Both modules are built with
featmap_names ["p2", "p3", "p4", "p5"] and the default level rule (canonical scale 224,
level 4) and called as ``pooler(features, boxes, [(800, 1216)] * 2)``: torchvision runs its
Python loop over levels (one roi_align per level plus the scatter into the output), ours
runs one fused ``instseg::multilevel_roi_align``. One timed iteration is one such call.

Configs: output 7x7 and 14x14 (sampling_ratio=2, aligned=False), forward ("fwd", under
no_grad) and forward+backward through autograd ("fwdbwd": features require grad,
``out.backward(grad)`` with a fixed random grad), dtypes float32/bfloat16 on CPU and
float16/bfloat16 on CUDA, NCHW and channels_last. Both modules get the same inputs; the
boxes are cast to the features' dtype because torchvision requires that. A dtype
torchvision rejects is reported as "n/a". On CUDA our backward op alone is also timed with
``deterministic=False`` and ``True`` (column ``det/def`` = deterministic / default time).

Before timing a config the forward outputs of both modules are compared once (max abs
diff, tolerance 1e-3 for float32, 5e-2 for half types); a mismatch prints a WARNING, with
each side's distance to torchvision run in float64 (``ref_diff``), but does not stop the run.
Timing (helpers shared with bench_roi_align.py): warmup 1 (CPU) / 5 (CUDA) iterations, then
the median of --repeats (default 3 on CPU, 20 on CUDA), in ms; CUDA uses events and
synchronizes. speedup = torchvision / ours.

Run (from the repo root, with instseg_ops installed or built in place, PYTHONPATH=. then):
    python benchmarks/bench_multilevel.py --quick     # float32, both layouts and sizes, 2 repeats: ~2-3 min on 2 cores
    python benchmarks/bench_multilevel.py             # all configs (+CUDA if present)
    python benchmarks/bench_multilevel.py --device cuda --sizes 14 --passes fwdbwd
The table is printed as it goes; all rows plus metadata are written as JSON to --out
(default benchmarks/out/multilevel_<device>.json).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_roi_align as base  # noqa: E402  shared shapes, RoIs, features, timing, metadata helpers

import instseg_ops  # noqa: E402
from instseg_ops.roi_align import boxes_to_rois, is_channels_last  # noqa: E402

try:
    import torchvision
    from torchvision.ops import MultiScaleRoIAlign as TVMultiScaleRoIAlign
except Exception:  # torchvision is an optional peer
    torchvision = None
    TVMultiScaleRoIAlign = None

ROIS_PER_IMAGE = 1000
FEATMAP_NAMES = [f"p{k}" for k in base.STRIDES]
IMAGE_SHAPES = [(base.IMAGE_H, base.IMAGE_W)] * base.BATCH
COLUMNS = [("device", 6), ("dtype", 9), ("layout", 13), ("rois", 6), ("out", 5), ("pass", 6),
           ("ours_ms", 9), ("tv_ms", 9), ("speedup", 7), ("max_diff", 9), ("det/def", 7)]


def make_boxes(seed=base.SEED):
    """List of BATCH Tensor[ROIS_PER_IMAGE, 4] (x1, y1, x2, y2) in image pixels, float32."""
    rois = base.make_rois(ROIS_PER_IMAGE * base.BATCH, seed)  # batch index = arange * BATCH // K: equal halves
    return [rois[rois[:, 0] == i, 1:].contiguous() for i in range(base.BATCH)]


def make_features(device, dtype, layout):
    return {f"p{k}": x for k, x in base.make_features(device, dtype, layout).items()}


def make_grad(size, device, dtype, seed=base.SEED + 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(ROIS_PER_IMAGE * base.BATCH, base.CHANNELS, size, size, generator=g).to(device=device, dtype=dtype)


def make_poolers(size):
    poolers = {"ours": instseg_ops.MultiScaleRoIAlign(FEATMAP_NAMES, size, base.SAMPLING_RATIO)}
    if TVMultiScaleRoIAlign is not None:
        poolers["tv"] = TVMultiScaleRoIAlign(FEATMAP_NAMES, size, base.SAMPLING_RATIO)
    return poolers


def check_agreement(poolers, feats, boxes):
    """Max abs diff of the forward outputs, ours vs torchvision; raises if torchvision fails."""
    with torch.no_grad():
        ours = poolers["ours"](feats, boxes, IMAGE_SHAPES)
        tv = poolers["tv"](feats, boxes, IMAGE_SHAPES)
        return (ours.float() - tv.float()).abs().max().item()


def reference_diffs(poolers, feats, boxes):
    """On a mismatch: each side's max abs diff to torchvision run in float64 on the same inputs."""
    with torch.no_grad():
        ref = poolers["tv"]({k: x.double() for k, x in feats.items()}, [b.double() for b in boxes], IMAGE_SHAPES)
        return {n: (poolers[n](feats, boxes, IMAGE_SHAPES).double() - ref).abs().max().item() for n in ("ours", "tv")}


def time_fwdbwd(pooler, feats, boxes, grad, device, warmup, repeats):
    """Forward + autograd backward; the features' .grad is cleared (untimed) before each step."""
    leaves = {k: x.detach().requires_grad_() for k, x in feats.items()}

    def clear():
        for x in leaves.values():
            x.grad = None

    def step():
        pooler(leaves, boxes, IMAGE_SHAPES).backward(grad)

    ms = base.timeit(step, device, warmup, repeats, setup=clear)
    clear()
    return ms


def time_det_backward(feats, boxes, grad, size, device, warmup, repeats):
    """Our fused backward op alone (CUDA only), default vs deterministic, with the grad in the forward's layout."""
    f = [feats[k] for k in FEATMAP_NAMES]
    rois = boxes_to_rois(boxes, f[0])
    levels = instseg_ops.assign_levels(rois, min(base.STRIDES), max(base.STRIDES))
    scales = [1.0 / s for s in base.STRIDES.values()]
    level_sizes = [f[0].shape[0], f[0].shape[1]] + [d for x in f for d in x.shape[2:]]
    cl = is_channels_last(f[0])
    g = grad.contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)

    def bwd(det):
        torch.ops.instseg._multilevel_roi_align_backward(g, rois, levels, scales, size, size, level_sizes,
                                                         base.SAMPLING_RATIO, False, cl, det)

    default = base.timeit(lambda: bwd(False), device, warmup, repeats)
    det = base.timeit(lambda: bwd(True), device, warmup, repeats)
    return {"ours_bwd_ms": default, "ours_det_bwd_ms": det, "det_ratio": det / default}


def run_device(device, args, rows):
    warmup = 5 if device == "cuda" else 1
    repeats = args.repeats or (20 if device == "cuda" else 3)
    dtypes = args.dtypes or (["float16", "bfloat16"] if device == "cuda" else ["float32", "bfloat16"])
    boxes32 = make_boxes()
    for dtype_name, layout in [(d, lay) for d in dtypes for lay in args.layouts]:
        dtype = base.DTYPES[dtype_name]
        tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        feats = make_features(device, dtype, layout)
        boxes = [b.to(device=device, dtype=dtype) for b in boxes32]
        levels = instseg_ops.assign_levels(boxes, min(base.STRIDES), max(base.STRIDES)) + min(base.STRIDES)
        per_level = {str(k): int((levels == k).sum()) for k in base.STRIDES}
        for size in args.sizes:
            poolers = make_poolers(size)
            grad = make_grad(size, device, dtype)
            tag = f"{device}/{dtype_name}/{layout}/{size}x{size}"
            tv_ok, diff = "tv" in poolers, None
            if tv_ok:
                try:
                    diff = check_agreement(poolers, feats, boxes)
                except Exception as e:  # noqa: BLE001  torchvision rejects this dtype/layout: "n/a"
                    tv_ok = False
                    base.note(f"torchvision n/a for {device}/{dtype_name}: {str(e).splitlines()[0][-90:]}")
            ref = None
            if diff is not None and not diff <= tol:
                ref = reference_diffs(poolers, feats, boxes)
                print(f"WARNING: ours vs torchvision MISMATCH on {tag}: max abs diff {diff:.3g} > {tol:g} "
                      f"(vs float64 reference: ours {ref['ours']:.3g}, torchvision {ref['tv']:.3g})", flush=True)
            for pass_name in args.passes:
                row = {"device": device, "dtype": dtype_name, "layout": layout, "images": base.BATCH,
                       "rois_per_image": ROIS_PER_IMAGE, "num_rois": ROIS_PER_IMAGE * base.BATCH,
                       "rois_per_level": per_level, "output_size": size, "sampling_ratio": base.SAMPLING_RATIO,
                       "pass": pass_name, "repeats": repeats, "warmup": warmup, "max_abs_diff": diff,
                       "ref_diff": ref, "tv_ms": None}
                for name, pooler in poolers.items():
                    if name == "tv" and not tv_ok:
                        continue
                    try:
                        if pass_name == "fwd":
                            with torch.no_grad():
                                ms = base.timeit(lambda: pooler(feats, boxes, IMAGE_SHAPES), device, warmup, repeats)
                        else:
                            ms = time_fwdbwd(pooler, feats, boxes, grad, device, warmup, repeats)
                    except Exception as e:  # noqa: BLE001  e.g. torchvision has no backward for this dtype
                        if name == "ours":
                            raise
                        base.note(f"torchvision n/a for {device}/{dtype_name}/{pass_name}: "
                                  f"{str(e).splitlines()[0][-90:]}")
                        ms = None
                    row[f"{name}_ms"] = ms
                if device == "cuda" and pass_name == "fwdbwd":
                    row.update(time_det_backward(feats, boxes, grad, size, device, warmup, repeats))
                row["speedup"] = row["tv_ms"] / row["ours_ms"] if row["tv_ms"] else None
                rows.append(row)
                base.print_row(row, COLUMNS)


def parse_args(argv=None):
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="default: cpu, plus cuda if available")
    p.add_argument("--sizes", type=lambda s: [int(t) for t in csv(s)], default=[7, 14])
    p.add_argument("--dtypes", type=csv, default=None, help="default: float32,bfloat16 (CPU); float16,bfloat16 (CUDA)")
    p.add_argument("--layouts", type=csv, default=list(base.LAYOUTS))
    p.add_argument("--passes", type=csv, default=["fwd", "fwdbwd"])
    p.add_argument("--repeats", type=int, default=None, help="default: 3 (CPU), 20 (CUDA)")
    p.add_argument("--quick", action="store_true", help="float32, both layouts and sizes, 2 repeats")
    p.add_argument("--out", default=None, help="default: benchmarks/out/multilevel_<device>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.dtypes, args.repeats = ["float32"], 2
    for name, values, allowed in [("dtypes", args.dtypes or [], base.DTYPES), ("layouts", args.layouts, base.LAYOUTS),
                                  ("passes", args.passes, ["fwd", "fwdbwd"])]:
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}, choose from {list(allowed)}")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda_ok = torch.cuda.is_available() and instseg_ops.cuda_built()
    if args.device == "cuda" and not cuda_ok:
        sys.exit("--device cuda: CUDA is not available or instseg_ops was built without CUDA kernels")
    if args.device == "all" and not cuda_ok:
        base.note("CUDA not available (or instseg_ops built without CUDA kernels): CPU only")
    devices = base.devices_for(args.device, cuda_ok)
    out = args.out or os.path.join("benchmarks", "out", f"multilevel_{'_'.join(devices)}.json")
    meta = dict(base.common_meta(devices), image=[base.IMAGE_H, base.IMAGE_W], channels=base.CHANNELS,
                batch=base.BATCH, featmap_names=FEATMAP_NAMES, strides=list(base.STRIDES.values()),
                rois_per_image=ROIS_PER_IMAGE, seed=base.SEED)
    base.run_all(meta, COLUMNS, devices, run_device, args, out,
                 headline=f"# MultiScaleRoIAlign: {base.BATCH} images x {ROIS_PER_IMAGE} RoIs, C={base.CHANNELS}, "
                          f"levels {FEATMAP_NAMES}")

if __name__ == "__main__":
    main()
