"""Benchmark ``instseg_ops.paste_masks`` / ``paste_masks_crops`` against torchvision and a grid_sample paster.

Peers, in the same run:
- ``tv``: torchvision's ``paste_masks_in_image`` (one interpolate per mask in a Python loop,
  then ``torch.stack``), padding 1; ``tv>=0.5`` is the same followed by ``>= 0.5``.
- ``grid_sample``: detectron2's algorithm, written here from its description: for a chunk of
  masks, map the centres of the pixels of the chunk's integer bounding region into each box,
  sample the masks with ``grid_sample(align_corners=False)`` and store ``>= 0.5`` into a bool
  N x H x W tensor. On the CPU each mask is its own chunk restricted to its box ("skip
  empty"); on CUDA the chunks are sized so that one chunk's float canvases stay under 1 GiB
  and cover the whole image. The masks are cast to float32 for grid_sample (as the peer does).
Ours: ``paste_masks`` (probabilities in the masks' dtype, or bool with ``threshold=0.5``, in
torchvision mode, and ``aligned=True`` for the grid_sample comparison) and ``paste_masks_crops``
(bool crops of the clipped boxes; no N x H x W tensor). ``prob_thp`` repeats ``prob`` with
INSTSEG_HUGEPAGES=1 (transparent huge pages for the lazily zeroed canvases; off by default).
``backward`` times only the backward pass of the probability paste (the gradient w.r.t. the
masks for a fixed random N x H x W incoming gradient; graph built before timing) against
torchvision's autograd through its per-mask interpolate; 800x1216 only.

Cases: 100 masks of 28x28 into 800x1216 and 300 into 3000x4000, float32 and float16 masks.
Inputs (fixed seed): uniform random probabilities; boxes with centres uniform in the image and
sides log-uniform in [16, 0.6 * min(H, W)] px (aspect ratio up to 2), so some reach the border.

Each (case, dtype, method) runs in a fresh subprocess: warmup 1, then the median of --repeats
(default 5; a peer call over 2 s is timed once, noted). Peak memory is the growth over the
inputs: on CPU the peak resident set (VmHWM after resetting it through /proc/self/clear_refs),
on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the call. The
CPU's peak RSS counts pages actually touched: ours allocates canvases from lazily zeroed
memory, so untouched background costs neither time nor RSS (it reads as zeros). torchvision's
float32 on 300 x 3000 x 4000 needs about twice the 14.4 GB output and is skipped when that
exceeds 70% of the available memory (noted). ``max_abs_diff`` compares ours with the peer on the
first 10 masks (bool: number of differing pixels).

Run (from the repo root):
    python benchmarks/bench_paste_masks.py --quick     # 800x1216 only, float32: ~1 min on 2 cores
    python benchmarks/bench_paste_masks.py             # both cases, float32 and float16 (+CUDA)
Rows are printed as they finish; all rows plus metadata go to --out
(default benchmarks/out/paste_masks_<device>.json).
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_roi_align as base  # noqa: E402  timing, metadata, formatting helpers
from peak_memory import PeakRSS  # noqa: E402

import instseg_ops  # noqa: E402

try:
    from torchvision.models.detection.roi_heads import paste_masks_in_image as tv_paste
except Exception:  # torchvision is an optional peer
    tv_paste = None

SEED = 0
M = 28
CASES = {"800x1216": (100, 800, 1216), "3000x4000": (300, 3000, 4000)}
DTYPES = {"float32": torch.float32, "float16": torch.float16}
GPU_MEM_LIMIT = 1 << 30
SLOW_S = 2.0
# comparison -> (peer method, our method)
COMPARISONS = {
    "prob": ("tv", "ours"),
    "prob_thp": ("tv", "ours+thp"),
    "bool": ("tv>=0.5", "ours>=0.5"),
    "bool_aligned": ("grid_sample", "ours_aligned>=0.5"),
    "crops_bool": ("tv>=0.5", "ours_crops>=0.5"),
    "backward": ("tv_bwd", "ours_bwd"),
}
# The gradient comparisons hold an N x H x W float incoming gradient: 800x1216 only.
BACKWARD_CASES = ("800x1216",)
COLUMNS = [("device", 6), ("case", 9), ("dtype", 7), ("comparison", 12), ("peer", 11), ("peer_ms", 9),
           ("ours_ms", 8), ("speedup", 8), ("peer_MB", 8), ("ours_MB", 8), ("out_MB", 7), ("diff", 7)]


def make_inputs(n, h, w, device, dtype, seed=SEED):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(n, M, M, generator=g)
    lo, hi = math.log(16), math.log(0.6 * min(h, w))
    side = torch.exp(torch.empty(n).uniform_(lo, hi, generator=g))
    aspect = torch.exp(torch.empty(n).uniform_(-math.log(2), math.log(2), generator=g))
    bw, bh = side * aspect.sqrt(), side / aspect.sqrt()
    cx, cy = torch.rand(n, generator=g) * w, torch.rand(n, generator=g) * h
    boxes = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], dim=1)
    return masks.to(device, dtype), boxes.to(device)


def grid_sample_paste(masks, boxes, h, w, threshold=0.5):
    """detectron2's chunked grid_sample pasting (from its description), bool output."""
    n = masks.shape[0]
    out = torch.zeros((n, h, w), dtype=torch.bool, device=masks.device)
    if masks.device.type == "cpu":
        chunks, skip_empty = torch.arange(n).split(1), True
    else:
        num_chunks = max(1, int(math.ceil(n * h * w * 4 / GPU_MEM_LIMIT)))
        chunks, skip_empty = torch.chunk(torch.arange(n, device=masks.device), num_chunks), False
    for inds in chunks:
        b = boxes[inds]
        if skip_empty:
            x0 = int(max(math.floor(b[:, 0].min().item()) - 1, 0))
            y0 = int(max(math.floor(b[:, 1].min().item()) - 1, 0))
            x1 = int(min(math.ceil(b[:, 2].max().item()) + 1, w))
            y1 = int(min(math.ceil(b[:, 3].max().item()) + 1, h))
            if x0 >= x1 or y0 >= y1:
                continue
        else:
            x0, y0, x1, y1 = 0, 0, w, h
        bx0, by0, bx1, by1 = (b[:, i:i + 1] for i in range(4))
        ys = torch.arange(y0, y1, device=b.device, dtype=torch.float32) + 0.5
        xs = torch.arange(x0, x1, device=b.device, dtype=torch.float32) + 0.5
        gy = (ys - by0) / (by1 - by0) * 2 - 1
        gx = (xs - bx0) / (bx1 - bx0) * 2 - 1
        k = b.shape[0]
        grid = torch.stack([gx[:, None, :].expand(k, y1 - y0, x1 - x0), gy[:, :, None].expand(k, y1 - y0, x1 - x0)],
                           dim=3)
        pasted = F.grid_sample(masks[inds, None].float(), grid, align_corners=False)[:, 0]
        out[inds, y0:y1, x0:x1] = pasted >= threshold
    return out


def backward_fn(paste, masks):
    """Times only the backward: the gradient of ``paste(m)`` for a fixed random incoming gradient."""
    m = masks.detach().clone().requires_grad_()
    out = paste(m)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(SEED + 1)).to(out.device, out.dtype)
    return lambda: torch.autograd.grad(out, m, g, retain_graph=True)[0]


def method_fn(name, masks, boxes, h, w):
    if name == "tv_bwd":
        return backward_fn(lambda m: tv_paste(m[:, None], boxes, (h, w), 1)[:, 0], masks)
    if name == "ours_bwd":
        return backward_fn(lambda m: instseg_ops.paste_masks(m, boxes, (h, w)), masks)
    if name == "tv":
        return lambda: tv_paste(masks[:, None], boxes, (h, w), 1)[:, 0]
    if name == "tv>=0.5":
        return lambda: tv_paste(masks[:, None], boxes, (h, w), 1)[:, 0] >= 0.5
    if name == "grid_sample":
        return lambda: grid_sample_paste(masks, boxes, h, w)
    if name in ("ours", "ours+thp"):  # +thp: the same call, run with INSTSEG_HUGEPAGES=1
        return lambda: instseg_ops.paste_masks(masks, boxes, (h, w))
    if name == "ours>=0.5":
        return lambda: instseg_ops.paste_masks(masks, boxes, (h, w), threshold=0.5)
    if name == "ours_aligned>=0.5":
        return lambda: instseg_ops.paste_masks(masks, boxes, (h, w), threshold=0.5, aligned=True)
    if name == "ours_crops>=0.5":
        return lambda: instseg_ops.paste_masks_crops(masks, boxes, (h, w), threshold=0.5)
    raise ValueError(name)


def worker(spec):
    """Runs one (case, dtype, method) in this process; prints a JSON result line."""
    device, case, dtype_name, method = spec["device"], spec["case"], spec["dtype"], spec["method"]
    n, h, w = CASES[case]
    masks, boxes = make_inputs(n, h, w, device, DTYPES[dtype_name])
    fn = method_fn(method, masks, boxes, h, w)
    res = {"note": None}
    # Peak memory of one call (the first, which also warms up).
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        res["peak_mb"] = (torch.cuda.max_memory_allocated() - before) / 2**20
    else:
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            out = fn()
            first_s = time.perf_counter() - t0
        res["peak_mb"] = peak.mb
    result = out[0] if isinstance(out, tuple) else out
    if isinstance(result, list):  # crops
        res["out_mb"] = sum(c.numel() * c.element_size() for c in result) / 2**20
    else:
        res["out_mb"] = result.numel() * result.element_size() / 2**20
    del out, result
    if spec.get("check") and tv_paste is not None:
        k = min(10, n)
        peer = spec["check"]
        ref = method_fn(peer, masks[:k], boxes[:k], h, w)()
        ours = method_fn(method, masks[:k], boxes[:k], h, w)()
        if isinstance(ours, tuple):  # crops -> canvases
            ours = instseg_ops.crops_to_canvas(ours[0], ours[1], (h, w))
        if ours.dtype == torch.bool:
            res["diff"] = float((ours != ref).sum().item())
        else:
            res["diff"] = (ours.float() - ref.float()).abs().max().item()
    repeats = spec["repeats"]
    if first_s > SLOW_S:
        res["ms"], res["note"] = first_s * 1e3, f"{method}: one call over {SLOW_S:g} s, timed once"
    else:
        res["ms"] = base.timeit(fn, device, 0, repeats)
    print("RESULT " + json.dumps(res), flush=True)


def run_method(device, case, dtype_name, method, repeats, check=None):
    spec = {"device": device, "case": case, "dtype": dtype_name, "method": method, "repeats": repeats,
            "check": check}
    env = dict(os.environ, INSTSEG_HUGEPAGES="1" if method.endswith("+thp") else "0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"{method} failed (exit {proc.returncode}): {tail[0][:200]}"}


def available_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def run_device(device, args, rows):
    for case in args.cases:
        n, h, w = CASES[case]
        for dtype_name in args.dtypes:
            results = {}
            for comparison in args.comparisons:
                if comparison.startswith("backward") and case not in BACKWARD_CASES:
                    continue
                peer, ours = COMPARISONS[comparison]
                row = {"device": device, "case": case, "num_masks": n, "image": [h, w], "mask_size": M,
                       "dtype": dtype_name, "comparison": comparison, "peer": peer, "ours": ours, "note": None}
                if peer not in results:
                    need = 2 * n * h * w * DTYPES[dtype_name].itemsize if peer.startswith("tv") else 0
                    avail = available_bytes() if device == "cpu" else None
                    if peer.startswith("tv") and tv_paste is None:
                        results[peer] = {"error": "torchvision not installed"}
                    elif avail is not None and need > 0.7 * avail:
                        results[peer] = {"error": f"{peer} skipped: needs ~{need / 2**30:.1f} GiB, "
                                                  f"{avail / 2**30:.1f} GiB available"}
                    else:
                        results[peer] = run_method(device, case, dtype_name, peer, args.repeats)
                res_peer = results[peer]
                res_ours = run_method(device, case, dtype_name, ours, args.repeats,
                                      check=peer if case == "800x1216" else None)
                notes = [r.get("note") or r.get("error") for r in (res_peer, res_ours) if r.get("note") or r.get("error")]
                row.update(peer_ms=res_peer.get("ms"), ours_ms=res_ours.get("ms"), peer_peak_mb=res_peer.get("peak_mb"),
                           ours_peak_mb=res_ours.get("peak_mb"), ours_out_mb=res_ours.get("out_mb"),
                           peer_out_mb=res_peer.get("out_mb"), diff=res_ours.get("diff"),
                           note="; ".join(notes) or None)
                row["speedup"] = (row["peer_ms"] / row["ours_ms"]) if row["peer_ms"] and row["ours_ms"] else None
                rows.append(row)
                cells = [device, case, dtype_name, comparison, peer, base.fmt(row["peer_ms"], ".1f"),
                         base.fmt(row["ours_ms"], ".1f"),
                         base.fmt(row["speedup"], ".1f") + ("x" if row["speedup"] else ""),
                         base.fmt(row["peer_peak_mb"], ".0f"), base.fmt(row["ours_peak_mb"], ".0f"),
                         base.fmt(row["ours_out_mb"], ".0f"), base.fmt(row["diff"], ".0e")]
                print("  ".join(c.rjust(wd) for c, (_, wd) in zip(cells, COLUMNS)), flush=True)
                if row["note"]:
                    base.note(row["note"])


def parse_args(argv=None):
    csv = lambda s: [t.strip() for t in s.split(",") if t.strip()]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default=None,
                   help="default: cpu, plus cuda if available")
    p.add_argument("--cases", type=csv, default=list(CASES))
    p.add_argument("--dtypes", type=csv, default=list(DTYPES))
    p.add_argument("--comparisons", type=csv, default=list(COMPARISONS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="800x1216, float32, 3 repeats")
    p.add_argument("--out", default=None, help="default: benchmarks/out/paste_masks_<device>.json")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.dtypes, args.repeats = ["800x1216"], ["float32"], 3
    for name, values, allowed in [("cases", args.cases, CASES), ("dtypes", args.dtypes, DTYPES),
                                  ("comparisons", args.comparisons, COMPARISONS)]:
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"--{name}: unknown {bad}, choose from {list(allowed)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return
    cuda_ok = torch.cuda.is_available() and instseg_ops.cuda_built()
    if args.device == "cuda" and not cuda_ok:
        sys.exit("--device cuda: CUDA is not available or instseg_ops was built without CUDA kernels")
    devices = base.devices_for(args.device, cuda_ok)
    out = args.out or os.path.join("benchmarks", "out", f"paste_masks_{'_'.join(devices)}.json")
    meta = dict(base.common_meta(devices), seed=SEED, mask_size=M, cases={k: list(v) for k, v in CASES.items()})
    base.run_all(meta, COLUMNS, devices, run_device, args, out)


if __name__ == "__main__":
    main()
