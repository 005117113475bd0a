"""Benchmark ``instseg_ops.nms`` / ``batched_nms`` against ``torchvision.ops.nms`` / ``batched_nms`` in the same run.

What it measures: one NMS call over N detector-like boxes, for N = 1k, 5k, 20k, 100k, 200k,
as plain ``nms`` (categories 0) and as class-aware ``batched_nms`` with 80 and 1000
categories, IoU threshold 0.5 (--iou). Inputs (fixed seed, generated in float32 and cast to
the benchmarked dtype): N/20 objects in a 1333x800 image, each with a centre uniform in the
image, a size log-uniform in [8, 400] px and an aspect ratio (h/w) log-uniform in [0.5, 2];
every box belongs to a random object and jitters around it (centre offset ~ N(0, 0.1 * object
w/h), width and height scaled by exp(N(0, 0.15))), clipped to the image, so many boxes
overlap as a detector's candidates do (about 10% survive NMS). Scores are distinct: a random
permutation of 1..N divided by N+1 (in float16 they tie once cast, see below). With
categories, each object gets a random category and each of its boxes keeps it with
probability 0.7, else takes a uniformly random one. Dtypes float32 and float16 (torchvision's
CPU kernel has no float16: reported as "n/a").

Before timing a config, both sides run once and the kept indices are compared (``identical``:
same indices in the same order; ``kept`` is our count). A difference prints a WARNING with
the number of tied input scores (ours orders ties by lower index, torchvision's sort does not
promise an order, so with ties a difference can be legitimate) and whether the kept sets
agree; it does not stop the run.
Timing (helpers shared with bench_roi_align.py): warmup 1 (CPU) / 5 (CUDA) calls, then the
median of --repeats (default 5 on CPU, 20 on CUDA), in ms; CUDA uses events and synchronizes.
speedup = torchvision / ours. torchvision's CPU nms is quadratic, so: when its comparison call
took more than 2 s, that call counts as its warmup and it is timed over 1 repeat (noted in
the row and the JSON); and before each size its time is estimated from the previous size's
(quadratic scaling) and torchvision is skipped ("n/a", noted) when the estimate exceeds
--max-tv-seconds (default 60). Ours always runs.

Run (from the repo root, with instseg_ops installed or built in place, PYTHONPATH=. then):
    python benchmarks/bench_nms.py --quick     # 1k/5k/20k, float32, nms + 80 categories: well under 2 min on 2 cores
    python benchmarks/bench_nms.py             # all configs (+CUDA if present and instseg::nms has a CUDA kernel)
    python benchmarks/bench_nms.py --device cuda --sizes 20000,200000 --categories 0,80 --dtypes float16
The table is printed as it goes; all rows plus metadata are written as JSON to --out
(default benchmarks/out/nms_<device>.json).
"""
import argparse
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_roi_align as base  # noqa: E402  timing, device name, note/fmt helpers

import instseg_ops  # noqa: E402

try:
    import torchvision
    from torchvision.ops import batched_nms as tv_batched_nms, nms as tv_nms
except Exception:  # torchvision is an optional peer
    torchvision = None
    tv_nms = tv_batched_nms = None

IMAGE_W, IMAGE_H = 1333, 800
BOXES_PER_OBJECT = 20
SEED = 0
SLOW_TV_S = 2.0  # torchvision calls slower than this are timed over a single repeat
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
COLUMNS = [("device", 6), ("dtype", 8), ("N", 7), ("categories", 10), ("kept", 6), ("ours_ms", 9),
           ("tv_ms", 9), ("speedup", 8), ("identical", 9)]


def make_inputs(n, categories, seed=SEED):
    """(boxes float32 Tensor[n, 4] as x1, y1, x2, y2 in pixels, scores float32 Tensor[n], idxs int64 Tensor[n] or None)."""
    g = torch.Generator().manual_seed(seed)
    k = max(1, n // BOXES_PER_OBJECT)
    size = torch.exp(torch.empty(k).uniform_(math.log(8), math.log(400), generator=g))
    ratio = torch.exp(torch.empty(k).uniform_(math.log(0.5), math.log(2.0), generator=g))  # h / w
    ow, oh = size / ratio.sqrt(), size * ratio.sqrt()
    ocx, ocy = torch.rand(k, generator=g) * IMAGE_W, torch.rand(k, generator=g) * IMAGE_H
    obj = torch.randint(0, k, (n,), generator=g)
    w = ow[obj] * torch.exp(0.15 * torch.randn(n, generator=g))
    h = oh[obj] * torch.exp(0.15 * torch.randn(n, generator=g))
    cx = ocx[obj] + 0.1 * ow[obj] * torch.randn(n, generator=g)
    cy = ocy[obj] + 0.1 * oh[obj] * torch.randn(n, generator=g)
    boxes = torch.stack([(cx - w / 2).clamp(0, IMAGE_W), (cy - h / 2).clamp(0, IMAGE_H),
                         (cx + w / 2).clamp(0, IMAGE_W), (cy + h / 2).clamp(0, IMAGE_H)], dim=1)
    scores = (torch.randperm(n, generator=g).double() + 1).div(n + 1).float()
    idxs = None
    if categories:
        obj_cat = torch.randint(0, categories, (k,), generator=g)
        keep_cat = torch.rand(n, generator=g) < 0.7
        idxs = torch.where(keep_cat, obj_cat[obj], torch.randint(0, categories, (n,), generator=g))
    return boxes, scores, idxs


def make_calls(boxes, scores, idxs, iou):
    """{name: zero-argument callable returning kept indices}, torchvision included when installed."""
    if idxs is None:
        calls = {"ours": lambda: instseg_ops.nms(boxes, scores, iou)}
        if tv_nms is not None:
            calls["tv"] = lambda: tv_nms(boxes, scores, iou)
    else:
        calls = {"ours": lambda: instseg_ops.batched_nms(boxes, scores, idxs, iou)}
        if tv_batched_nms is not None:
            calls["tv"] = lambda: tv_batched_nms(boxes, scores, idxs, iou)
    return calls


def timed_call(fn, device):
    """(result, seconds) of one call, synchronizing on CUDA."""
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def run_device(device, args, rows):
    warmup = 5 if device == "cuda" else 1
    repeats = args.repeats or (20 if device == "cuda" else 5)
    last_tv = {}  # (dtype, categories) -> (N, torchvision seconds per call, measured or estimated)
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        for categories in args.categories:
            for n in args.sizes:
                b32, s32, idxs = make_inputs(n, categories)
                boxes, scores = b32.to(device=device, dtype=dtype), s32.to(device=device, dtype=dtype)
                idxs = None if idxs is None else idxs.to(device)
                calls = make_calls(boxes, scores, idxs, args.iou)
                tag = f"{device}/{dtype_name}/N={n}/categories={categories}"
                row = {"device": device, "dtype": dtype_name, "num_boxes": n, "categories": categories,
                       "op": "batched_nms" if categories else "nms", "num_objects": max(1, n // BOXES_PER_OBJECT),
                       "iou_threshold": args.iou, "tied_scores": n - int(torch.unique(scores).numel()),
                       "repeats": repeats, "warmup": warmup, "kept": None, "tv_kept": None, "identical": None,
                       "ours_ms": None, "tv_ms": None, "speedup": None, "tv_repeats": None, "tv_warmup": None,
                       "tv_estimate_s": None, "tv_note": None}
                kept_ours = calls["ours"]()
                row["kept"] = int(kept_ours.numel())
                kept_tv, tv_s = None, None
                if "tv" in calls:
                    prev = last_tv.get((dtype_name, categories))
                    est = prev[1] * (n / prev[0]) ** 2 if prev else None
                    row["tv_estimate_s"] = est
                    if est is not None and est > args.max_tv_seconds:
                        row["tv_note"] = f"tv skipped: est. {est:.0f} s/call > --max-tv-seconds {args.max_tv_seconds:g}"
                        last_tv[(dtype_name, categories)] = (n, est)
                    else:
                        try:
                            kept_tv, tv_s = timed_call(calls["tv"], device)
                        except Exception as e:  # noqa: BLE001  torchvision rejects this dtype: "n/a"
                            base.note(f"torchvision n/a for {device}/{dtype_name}: {str(e).splitlines()[0][-90:]}")
                if kept_tv is not None:
                    a, b = kept_ours.cpu(), kept_tv.cpu()
                    row["tv_kept"], row["identical"] = int(b.numel()), bool(torch.equal(a, b))
                    if not row["identical"]:
                        row["same_set"] = bool(torch.equal(a.sort()[0], b.sort()[0]))
                        print(f"WARNING: ours vs torchvision kept indices DIFFER on {tag}: ours keeps {a.numel()}, "
                              f"torchvision {b.numel()}, same set: {row['same_set']}, tied input scores: "
                              f"{row['tied_scores']} (ties are ordered by lower index in ours, unspecified in "
                              f"torchvision)", flush=True)
                row["ours_ms"] = base.timeit(calls["ours"], device, warmup, repeats)
                if kept_tv is not None:
                    if tv_s > SLOW_TV_S:  # the comparison call above was its warmup
                        row["tv_warmup"], row["tv_repeats"] = 0, 1
                        row["tv_note"] = f"tv: 1 repeat (> {SLOW_TV_S:g} s/call; comparison call as warmup)"
                    else:
                        row["tv_warmup"], row["tv_repeats"] = warmup, repeats
                    row["tv_ms"] = base.timeit(calls["tv"], device, row["tv_warmup"], row["tv_repeats"])
                    last_tv[(dtype_name, categories)] = (n, row["tv_ms"] / 1e3)
                    row["speedup"] = row["tv_ms"] / row["ours_ms"]
                rows.append(row)
                print_row(row)


def print_row(row):
    ident = "n/a" if row["identical"] is None else ("yes" if row["identical"] else "NO")
    cells = [row["device"], row["dtype"], str(row["num_boxes"]), str(row["categories"]), str(row["kept"]),
             base.fmt(row["ours_ms"], ".2f"), base.fmt(row["tv_ms"], ".2f"),
             base.fmt(row["speedup"], ".2f") + ("x" if row["speedup"] else ""), ident]
    line = "  ".join(c.rjust(w) for c, (_, w) in zip(cells, COLUMNS))
    print(line + (f"  # {row['tv_note']}" if row["tv_note"] else ""), flush=True)


def parse_args(argv=None):
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    ints = lambda s: [int(t) for t in csv(s)]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="default: cpu, plus cuda if available and instseg::nms has a CUDA kernel")
    p.add_argument("--sizes", type=ints, default=[1000, 5000, 20000, 100000, 200000], help="numbers of boxes")
    p.add_argument("--categories", type=ints, default=[0, 80, 1000],
                   help="0 = plain nms, C > 0 = batched_nms with C categories")
    p.add_argument("--dtypes", type=csv, default=["float32", "float16"])
    p.add_argument("--iou", type=float, default=0.5, help="IoU threshold")
    p.add_argument("--repeats", type=int, default=None, help="default: 5 (CPU), 20 (CUDA)")
    p.add_argument("--max-tv-seconds", type=float, default=60.0,
                   help="skip torchvision when its estimated time per call (quadratic in N) exceeds this")
    p.add_argument("--quick", action="store_true", help="N = 1k, 5k, 20k; float32; categories 0, 80")
    p.add_argument("--out", default=None, help="default: benchmarks/out/nms_<device>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.dtypes, args.categories = [1000, 5000, 20000], ["float32"], [0, 80]
    bad = [v for v in args.dtypes if v not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}, choose from {list(DTYPES)}")
    if any(n < 1 for n in args.sizes) or any(c < 0 for c in args.categories):
        p.error("--sizes must be >= 1 and --categories >= 0")
    if args.repeats is not None and args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda_ok = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key("instseg::nms", "CUDA")
    if args.device in ("cuda", "all") and not cuda_ok:
        base.note("CUDA skipped: CUDA is not available or instseg_ops was built without CUDA kernels")
    if args.device == "cuda" and not cuda_ok:
        return
    devices = base.devices_for(args.device, cuda_ok)
    out = args.out or os.path.join("benchmarks", "out", f"nms_{'_'.join(devices)}.json")
    meta = dict(base.common_meta(devices), image=[IMAGE_W, IMAGE_H], boxes_per_object=BOXES_PER_OBJECT,
                iou_threshold=args.iou, max_tv_seconds=args.max_tv_seconds, slow_tv_seconds=SLOW_TV_S, seed=SEED)
    base.run_all(meta, COLUMNS, devices, run_device, args, out,
                 headline=f"# NMS: {IMAGE_W}x{IMAGE_H} image, N/{BOXES_PER_OBJECT} objects, IoU {args.iou:g}; "
                          f"categories 0 = nms, C > 0 = batched_nms")

if __name__ == "__main__":
    main()
