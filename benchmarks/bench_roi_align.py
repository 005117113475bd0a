"""Benchmark ``instseg_ops.roi_align`` against ``torchvision.ops.roi_align`` in the same run.

What it measures: the RoIAlign cost of one Mask R-CNN box/mask head call. Features are
those of an 800x1216 image, C=256, batch of 2, on the four FPN levels (strides 4, 8, 16, 32,
i.e. 200x304, 100x152, 50x76, 25x38). A fixed-seed set of 512 or 2000 RoIs (spread over the
2 images, sizes log-uniform in [16, 800] px, aspect ratios in [0.5, 2], centres uniform in
the image, clipped to it) is split by FPN level with torchvision's LevelMapper rule, and
roi_align runs once per level with that level's feature map and spatial_scale = 1/stride.
One timed iteration is that whole per-level loop (the sum over the 4 levels).

Configs: output 7x7 and 14x14 (sampling_ratio=2, aligned=False), forward ("fwd") and
forward+backward through autograd ("fwdbwd": features require grad, ``out.backward(grad)``
with a fixed random grad), dtypes float32/bfloat16 on CPU and float16/bfloat16 on CUDA,
NCHW and channels_last. Both ops get the same inputs; the RoIs are cast to the features'
dtype because torchvision requires that. A dtype torchvision rejects is reported as "n/a".
On CUDA the backward op alone is also timed with ``deterministic=False`` and ``True``
(column ``det/def`` = deterministic / default backward time).

Before timing a config the forward outputs of both ops are compared once (max abs diff,
tolerance 1e-3 for float32, 5e-2 for half types); a mismatch prints a WARNING, with each
side's distance to a float64 reference (``ref_diff``), but does not stop the run.
Timing: warmup 1 (CPU) / 5 (CUDA) iterations, then the median of --repeats (default 5 on
CPU, 20 on CUDA), in ms; CUDA uses events and synchronizes. speedup = torchvision / ours.

Run (from the repo root, with the extension built in place):
    PYTHONPATH=. python benchmarks/bench_roi_align.py --quick     # 512 RoIs, float32: ~1 min on 2 cores
    PYTHONPATH=. python benchmarks/bench_roi_align.py             # all configs: ~6 min on 2 cores (+CUDA if present)
    PYTHONPATH=. python benchmarks/bench_roi_align.py --device cuda --rois 2000 --sizes 14
The table is printed as it goes; all rows plus metadata are written as JSON to --out
(default benchmarks/out/roi_align_<device>.json).
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

import instseg_ops
from instseg_ops.roi_align import is_channels_last

try:
    import torchvision
    from torchvision.ops import roi_align as tv_roi_align
except Exception:  # torchvision is an optional peer
    torchvision = None
    tv_roi_align = None

IMAGE_H, IMAGE_W, CHANNELS, BATCH = 800, 1216, 256, 2
STRIDES = {2: 4, 3: 8, 4: 16, 5: 32}  # FPN level k -> stride
SAMPLING_RATIO = 2
SEED = 0
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
COLUMNS = [("device", 6), ("dtype", 9), ("layout", 13), ("rois", 5), ("out", 5), ("pass", 6),
           ("ours_ms", 9), ("tv_ms", 9), ("speedup", 7), ("max_diff", 9), ("det/def", 7)]


_NOTED = set()


def note(msg):
    """Print an informational line once (the same torchvision error recurs for every config)."""
    if msg not in _NOTED:
        _NOTED.add(msg)
        print(f"# {msg}", flush=True)


def make_rois(num_rois, seed=SEED):
    """Tensor[K, 5] (batch index, x1, y1, x2, y2) in image pixels, sorted by batch index."""
    g = torch.Generator().manual_seed(seed)
    size = torch.exp(torch.empty(num_rois).uniform_(math.log(16), math.log(800), generator=g))
    ratio = torch.exp(torch.empty(num_rois).uniform_(math.log(0.5), math.log(2.0), generator=g))  # h / w
    w, h = size / ratio.sqrt(), size * ratio.sqrt()
    cx = torch.rand(num_rois, generator=g) * IMAGE_W
    cy = torch.rand(num_rois, generator=g) * IMAGE_H
    boxes = torch.stack([(cx - w / 2).clamp(0, IMAGE_W), (cy - h / 2).clamp(0, IMAGE_H),
                         (cx + w / 2).clamp(0, IMAGE_W), (cy + h / 2).clamp(0, IMAGE_H)], dim=1)
    batch_idx = (torch.arange(num_rois) * BATCH // num_rois).float().unsqueeze(1)
    return torch.cat([batch_idx, boxes], dim=1)


def fpn_levels(rois, k_min=2, k_max=5, canonical_scale=224, canonical_level=4, eps=1e-6):
    """FPN level per RoI, as torchvision's LevelMapper: floor(4 + log2(sqrt(area) / 224) + eps), clamped."""
    area = (rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2])
    k = torch.floor(canonical_level + torch.log2(area.sqrt() / canonical_scale) + eps)
    return k.clamp(k_min, k_max).to(torch.int64)


def make_features(device, dtype, layout, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for k, s in STRIDES.items():
        x = torch.randn(BATCH, CHANNELS, IMAGE_H // s, IMAGE_W // s, generator=g)
        feats[k] = x.to(device=device, dtype=dtype).contiguous(memory_format=LAYOUTS[layout])
    return feats


def make_grads(rois_per_level, size, device, dtype, seed=SEED + 1):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(r.shape[0], CHANNELS, size, size, generator=g).to(device=device, dtype=dtype)
            for k, r in rois_per_level.items()}


def run_levels(fn, feats, per_level, size):
    """The per-level loop of Mask R-CNN's MultiScaleRoIAlign: {level: pooled features}."""
    return {k: fn(feats[k], r, size, 1.0 / STRIDES[k], SAMPLING_RATIO, False) for k, r in per_level.items()}


def timeit(fn, device, warmup, repeats, setup=None):
    """Median wall time of fn() in ms; setup() (untimed) runs before every call."""
    times = []
    for i in range(warmup + repeats):
        if setup is not None:
            setup()
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            fn()
            elapsed = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(elapsed)
    return statistics.median(times)


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor()
    if not name or name in ("x86_64", "aarch64", "arm", "i386"):
        try:
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
        except OSError:
            pass
    return name or platform.machine()


def check_agreement(impls, feats, per_level, size):
    """Max abs diff of the forward outputs, ours vs torchvision; raises if torchvision fails."""
    with torch.no_grad():
        ours = run_levels(impls["ours"], feats, per_level, size)
        tv = run_levels(impls["tv"], feats, per_level, size)
        return max((ours[k].float() - tv[k].float()).abs().max().item() for k in per_level)


def reference_diffs(impls, feats, per_level, size):
    """On a mismatch: each side's max abs diff to torchvision run in float64 on the same inputs."""
    with torch.no_grad():
        ref = run_levels(impls["tv"], {k: x.double() for k, x in feats.items()},
                         {k: r.double() for k, r in per_level.items()}, size)
        return {name: max((out[k].double() - ref[k]).abs().max().item() for k in per_level)
                for name, out in ((n, run_levels(impls[n], feats, per_level, size)) for n in ("ours", "tv"))}


def run_device(device, args, rows):
    warmup = 5 if device == "cuda" else 1
    repeats = args.repeats or (20 if device == "cuda" else 5)
    dtypes = args.dtypes or (["float16", "bfloat16"] if device == "cuda" else ["float32", "bfloat16"])
    impls = {"ours": instseg_ops.roi_align}
    if tv_roi_align is not None:
        impls["tv"] = tv_roi_align
    for dtype_name, layout in [(d, lay) for d in dtypes for lay in args.layouts]:
        dtype = DTYPES[dtype_name]
        tol = 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2
        feats = make_features(device, dtype, layout)
        for num_rois, size in [(n, s) for n in args.rois for s in args.sizes]:
            rois = make_rois(num_rois)
            level = fpn_levels(rois)
            per_level = {k: rois[level == k].to(device=device, dtype=dtype) for k in STRIDES if (level == k).any()}
            grads = make_grads(per_level, size, device, dtype)
            tag = f"{device}/{dtype_name}/{layout}/{num_rois} RoIs/{size}x{size}"
            tv_ok, diff = "tv" in impls, None
            if tv_ok:
                try:
                    diff = check_agreement(impls, feats, per_level, size)
                except Exception as e:  # noqa: BLE001  torchvision rejects this dtype/layout: "n/a"
                    tv_ok = False
                    note(f"torchvision n/a for {device}/{dtype_name}: {str(e).splitlines()[0][-90:]}")
            ref = None
            if diff is not None and not diff <= tol:
                ref = reference_diffs(impls, feats, per_level, size)
                print(f"WARNING: ours vs torchvision MISMATCH on {tag}: max abs diff {diff:.3g} > {tol:g} "
                      f"(vs float64 reference: ours {ref['ours']:.3g}, torchvision {ref['tv']:.3g})", flush=True)
            for pass_name in args.passes:
                row = {"device": device, "dtype": dtype_name, "layout": layout, "num_rois": num_rois,
                       "rois_per_level": {str(k): int(r.shape[0]) for k, r in per_level.items()},
                       "output_size": size, "sampling_ratio": SAMPLING_RATIO, "pass": pass_name,
                       "repeats": repeats, "warmup": warmup, "max_abs_diff": diff, "ref_diff": ref, "tv_ms": None}
                for name, fn in impls.items():
                    if name == "tv" and not tv_ok:
                        continue
                    try:
                        if pass_name == "fwd":
                            with torch.no_grad():
                                ms = timeit(lambda: run_levels(fn, feats, per_level, size), device, warmup, repeats)
                        else:
                            ms = time_fwdbwd(fn, feats, per_level, grads, size, device, warmup, repeats)
                    except Exception as e:  # noqa: BLE001  e.g. torchvision has no backward for this dtype
                        if name == "ours":
                            raise
                        note(f"torchvision n/a for {device}/{dtype_name}/{pass_name}: {str(e).splitlines()[0][-90:]}")
                        ms = None
                    row[f"{name}_ms"] = ms
                if device == "cuda" and pass_name == "fwdbwd":
                    row.update(time_det_backward(feats, per_level, grads, size, device, warmup, repeats))
                row["speedup"] = row["tv_ms"] / row["ours_ms"] if row["tv_ms"] else None
                rows.append(row)
                print_row(row)


def time_fwdbwd(fn, feats, per_level, grads, size, device, warmup, repeats):
    """Forward + autograd backward over all levels; the features' .grad is cleared (untimed) before each step."""
    leaves = {k: x.detach().requires_grad_() for k, x in feats.items()}

    def clear():
        for x in leaves.values():
            x.grad = None

    def step():
        for k, out in run_levels(fn, leaves, per_level, size).items():
            out.backward(grads[k])

    ms = timeit(step, device, warmup, repeats, setup=clear)
    clear()
    return ms


def time_det_backward(feats, per_level, grads, size, device, warmup, repeats):
    """Our backward op alone (CUDA only), default vs deterministic, with grads in the forward's layout."""
    args = []
    for k, r in per_level.items():
        cl = is_channels_last(feats[k])
        g = grads[k].contiguous(memory_format=torch.channels_last if cl else torch.contiguous_format)
        args.append((g, r, 1.0 / STRIDES[k], size, size, *feats[k].shape, SAMPLING_RATIO, False, cl))

    def bwd(det):
        for a in args:
            torch.ops.instseg._roi_align_backward(*a, det)

    default = timeit(lambda: bwd(False), device, warmup, repeats)
    det = timeit(lambda: bwd(True), device, warmup, repeats)
    return {"ours_bwd_ms": default, "ours_det_bwd_ms": det, "det_ratio": det / default}


def fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def print_row(row, columns=None):
    """One table row of a RoIAlign benchmark (also used by bench_multilevel with its columns)."""
    cells = [row["device"], row["dtype"], row["layout"], str(row["num_rois"]),
             f"{row['output_size']}x{row['output_size']}", row["pass"], fmt(row["ours_ms"], ".2f"),
             fmt(row.get("tv_ms"), ".2f"), fmt(row["speedup"], ".2f") + ("x" if row["speedup"] else ""),
             fmt(row["max_abs_diff"], ".1e"), fmt(row["det_ratio"], ".2f") if "det_ratio" in row else "-"]
    print("  ".join(c.rjust(w) for c, (_, w) in zip(cells, columns or COLUMNS)), flush=True)


def parse_args(argv=None):
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="default: cpu, plus cuda if available")
    p.add_argument("--rois", type=lambda s: [int(t) for t in csv(s)], default=[512, 2000])
    p.add_argument("--sizes", type=lambda s: [int(t) for t in csv(s)], default=[7, 14])
    p.add_argument("--dtypes", type=csv, default=None, help="default: float32,bfloat16 (CPU); float16,bfloat16 (CUDA)")
    p.add_argument("--layouts", type=csv, default=list(LAYOUTS))
    p.add_argument("--passes", type=csv, default=["fwd", "fwdbwd"])
    p.add_argument("--repeats", type=int, default=None, help="default: 5 (CPU), 20 (CUDA)")
    p.add_argument("--quick", action="store_true", help="512 RoIs, float32, both layouts and sizes, 3 repeats")
    p.add_argument("--out", default=None, help="default: benchmarks/out/roi_align_<device>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.rois, args.dtypes, args.repeats = [512], ["float32"], 3
    for name, values, allowed in [("dtypes", args.dtypes or [], DTYPES), ("layouts", args.layouts, LAYOUTS),
                                  ("passes", args.passes, ["fwd", "fwdbwd"])]:
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}, choose from {list(allowed)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    cuda_ok = torch.cuda.is_available() and instseg_ops.cuda_built()
    if args.device == "cuda" and not cuda_ok:
        sys.exit("--device cuda: CUDA is not available or instseg_ops was built without CUDA kernels")
    if args.device == "all" and not cuda_ok:
        note("CUDA not available (or instseg_ops built without CUDA kernels): CPU only")
    devices = devices_for(args.device, cuda_ok)
    out = args.out or os.path.join("benchmarks", "out", f"roi_align_{'_'.join(devices)}.json")
    meta = dict(common_meta(devices), image=[IMAGE_H, IMAGE_W], channels=CHANNELS, batch=BATCH,
                strides=list(STRIDES.values()), seed=SEED)
    run_all(meta, COLUMNS, devices, run_device, args, out)


def git_commit():
    """(commit, dirty) of the checkout this runs from, or (None, None) outside git."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return commit, dirty
    except (OSError, subprocess.CalledProcessError):
        return None, None


def devices_for(device_arg, cuda_ok):
    """Devices to run: --device cpu|cuda, or both (None/all) when CUDA is usable."""
    if device_arg in (None, "all"):
        return ["cpu", "cuda"] if cuda_ok else ["cpu"]
    return [device_arg]


def common_meta(devices):
    """Metadata every benchmark records: when, what code, which libraries and devices, how run."""
    commit, dirty = git_commit()
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, torchvision=getattr(torchvision, "__version__", None),
                instseg_ops=instseg_ops.__version__, commit=commit, dirty=dirty,
                devices={d: device_name(d) for d in devices}, num_threads=torch.get_num_threads(),
                command=" ".join([sys.executable] + sys.argv))


def run_all(meta, columns, devices, run_device, args, out, headline=None):
    """Shared by the benchmark scripts: header, run_device per device, JSON with meta and rows."""
    print(f"# torch {meta['torch']}, torchvision {meta['torchvision'] or 'not installed'}, "
          f"threads {meta['num_threads']}, devices {meta['devices']}", flush=True)
    if headline:
        print(headline, flush=True)
    print("  ".join(n.rjust(w) for n, w in columns), flush=True)
    rows = []
    t0 = time.perf_counter()
    for device in devices:
        run_device(device, args, rows)
    meta["total_s"] = round(time.perf_counter() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"# {len(rows)} rows in {meta['total_s']} s, written to {out}", flush=True)


if __name__ == "__main__":
    main()
