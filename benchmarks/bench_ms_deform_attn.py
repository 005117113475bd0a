"""Benchmark ``instseg_ops.ms_deform_attn`` against the grid_sample formulation in the same run.

The grid_sample formulation is ``instseg_ops.reference.ms_deform_attn_reference``: one
``F.grid_sample`` per level, then a weighted sum, as transformers' pure-PyTorch
``multi_scale_deformable_attention`` and Deformable DETR's ``ms_deform_attn_core_pytorch``
(the path every CPU user runs today; the reference CUDA op has no CPU kernel).

Shapes (M = 8 heads, D = 32 channels per head, P = 4 points, random inputs, fixed seed):
  m2f_512   Mask2Former pixel-decoder encoder: batch 2, levels at strides 8/16/32 of a
            512x512 image (64x64, 32x32, 16x16), Lq = S = 5376
  m2f_1024  the same for a 1024x1024 image (128x128, 64x64, 32x32), Lq = S = 21504
  ddetr     Deformable-DETR decoder: batch 2, Lq = 300, 4 levels at strides 8/16/32/64 of
            an 800x1216 image (100x152, 50x76, 25x38, 13x19)
Locations are uniform in [-0.05, 1.05] (a few off the levels), weights softmaxed over L * P.

Passes: "fwd" (no autograd) and "fwdbwd" (value, locations and weights require grad;
``out.backward(grad)`` with a fixed random grad). Timing: 1 warmup (5 on CUDA), then the
median of --repeats (3 on CPU, 20 on CUDA), in ms; speedup = reference / ours.
Peak memory (CPU): each (shape, implementation, pass) is run once more in a fresh
subprocess; the number is the process's peak resident memory during the call minus its
resident memory before it (VmHWM reset through /proc/self/clear_refs), i.e. the extra
memory the call needs on top of its inputs. On CUDA: torch.cuda.max_memory_allocated.

Targets (issue 18), checked and printed at the end:
  CPU float32: forward >= 3x and forward+backward >= 3x the reference; peak memory no higher.
  CUDA: forward and forward+backward >= 2x the reference; the deterministic backward at
        most 1.5x the time of the atomic one.
bfloat16 rows are ours only when grid_sample rejects bfloat16 ("n/a").

Run (from the repo root, with the extension built in place):
    PYTHONPATH=. python benchmarks/bench_ms_deform_attn.py                 # CPU, all shapes
    PYTHONPATH=. python benchmarks/bench_ms_deform_attn.py --shapes m2f_512 ddetr --no-memory
    PYTHONPATH=. python benchmarks/bench_ms_deform_attn.py --device cuda   # on a GPU
Rows and metadata are written as JSON to --out (default benchmarks/out/ms_deform_attn_<device>.json).
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import instseg_ops  # noqa: E402
from instseg_ops import ms_deform_attn  # noqa: E402
from instseg_ops.reference import ms_deform_attn_reference  # noqa: E402
from peak_memory import PeakRSS  # noqa: E402

HEADS, DIM, POINTS, SEED = 8, 32, 4, 0
SHAPES = {
    "m2f_512": dict(batch=2, levels=[(64, 64), (32, 32), (16, 16)], queries=None),
    "m2f_1024": dict(batch=2, levels=[(128, 128), (64, 64), (32, 32)], queries=None),
    "ddetr": dict(batch=2, levels=[(100, 152), (50, 76), (25, 38), (13, 19)], queries=300),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
CPU_TARGET, GPU_TARGET, DET_TARGET = 3.0, 2.0, 1.5


def make_inputs(name, device, dtype, requires_grad):
    cfg = SHAPES[name]
    g = torch.Generator().manual_seed(SEED)
    n, levels = cfg["batch"], cfg["levels"]
    s = sum(h * w for h, w in levels)
    lq = cfg["queries"] or s
    value = torch.randn(n, s, HEADS, DIM, generator=g, dtype=torch.float32)
    loc = torch.rand(n, lq, HEADS, len(levels), POINTS, 2, generator=g, dtype=torch.float32) * 1.1 - 0.05
    attn = torch.rand(n, lq, HEADS, len(levels) * POINTS, generator=g, dtype=torch.float32).softmax(-1)
    attn = attn.view(n, lq, HEADS, len(levels), POINTS)
    ins = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in (value, loc, attn)]
    grad = torch.randn(n, lq, HEADS * DIM, generator=torch.Generator().manual_seed(SEED + 1)).to(device, dtype)
    return levels, ins, grad


def impl_fn(impl, levels, deterministic=None):
    if impl == "ours":
        tables = None

        def f(v, lo, a):
            nonlocal tables
            if tables is None:  # built once, as a model would
                from instseg_ops.ms_deform_attn import _level_tables
                tables = _level_tables(levels, None, v.device)
            return ms_deform_attn(v, tables[0], tables[1], lo, a, deterministic=deterministic)
        return f
    return lambda v, lo, a: ms_deform_attn_reference(v, levels, lo, a)


def call(fn, ins, grad, pass_name):
    if pass_name == "fwd":
        with torch.no_grad():
            return fn(*ins)
    for t in ins:
        t.grad = None
    out = fn(*ins)
    out.backward(grad)
    return out


def timeit(fn, device, warmup, repeats):
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure_memory_here(name, impl, pass_name, dtype_name):
    """In a fresh process: extra peak resident memory (MiB) of one call."""
    levels, ins, grad = make_inputs(name, "cpu", DTYPES[dtype_name], pass_name == "fwdbwd")
    fn = impl_fn(impl, levels)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    with PeakRSS() as peak:
        call(fn, ins, grad, pass_name)
    if peak.mb is None:
        raise RuntimeError("cannot reset VmHWM through /proc/self/clear_refs")
    return peak.mb


def measure_memory(name, impl, pass_name, dtype_name):
    cmd = [sys.executable, os.path.abspath(__file__), "--_memory", name, impl, pass_name, dtype_name]
    env = dict(os.environ, BENCH_THREADS=str(torch.get_num_threads()))
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env, timeout=900)
        return float(out.stdout.strip().splitlines()[-1])
    except Exception as e:  # noqa: BLE001
        print(f"# memory measurement failed for {name}/{impl}/{pass_name}: {e}", flush=True)
        return None


def gpu_peak(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def run(args):
    device = args.device
    warmup = 5 if device == "cuda" else 1
    repeats = args.repeats or (20 if device == "cuda" else 3)
    dtypes = args.dtypes or (["float32", "bfloat16"] if device == "cpu" else ["float32", "float16", "bfloat16"])
    rows = []
    print(f"{'shape':9} {'dtype':9} {'pass':7} {'ours_ms':>9} {'ref_ms':>9} {'speedup':>8} "
          f"{'ours_MiB':>9} {'ref_MiB':>9} {'max_diff':>9}", flush=True)
    for name in args.shapes:
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            levels, ins, grad = make_inputs(name, device, dtype, True)
            ours, ref = impl_fn("ours", levels), impl_fn("reference", levels)
            ref_ok, diff = True, None
            with torch.no_grad():
                out = ours(*ins)
                try:
                    diff = (out.float() - ref(*ins).float()).abs().max().item()
                except Exception as e:  # noqa: BLE001  grid_sample rejects the dtype
                    ref_ok = False
                    print(f"# reference n/a for {device}/{dtype_name}: {str(e).splitlines()[0][-90:]}", flush=True)
            del out
            for pass_name in args.passes:
                t_ours = timeit(lambda: call(ours, ins, grad, pass_name), device, warmup, repeats)
                t_ref = timeit(lambda: call(ref, ins, grad, pass_name), device, warmup, repeats) if ref_ok else None
                mem_ours = mem_ref = None
                if device == "cuda":
                    mem_ours = gpu_peak(lambda: call(ours, ins, grad, pass_name))
                    mem_ref = gpu_peak(lambda: call(ref, ins, grad, pass_name)) if ref_ok else None
                elif args.memory:
                    mem_ours = measure_memory(name, "ours", pass_name, dtype_name)
                    mem_ref = measure_memory(name, "reference", pass_name, dtype_name) if ref_ok else None
                speedup = t_ref / t_ours if t_ref else None
                row = dict(device=device, shape=name, dtype=dtype_name, pass_=pass_name, ours_ms=t_ours, ref_ms=t_ref,
                           speedup=speedup, ours_peak_mib=mem_ours, ref_peak_mib=mem_ref, max_diff=diff)
                rows.append(row)
                print(f"{name:9} {dtype_name:9} {pass_name:7} {t_ours:9.1f} {fmt(t_ref):>9} "
                      f"{fmt(speedup, '.2f') + ('x' if speedup else ''):>8} {fmt(mem_ours):>9} {fmt(mem_ref):>9} "
                      f"{fmt(diff, '.2e'):>9}", flush=True)
            if device == "cuda":  # backward op alone: atomic vs deterministic
                v, lo, a = (t.detach() for t in ins)
                from instseg_ops.ms_deform_attn import _level_tables
                st, lsi = _level_tables(levels, None, v.device)
                bwd = torch.ops.instseg._ms_deform_attn_backward
                t_atomic = timeit(lambda: bwd(grad, v, st, lsi, lo, a, False), device, warmup, repeats)
                t_det = timeit(lambda: bwd(grad, v, st, lsi, lo, a, True), device, warmup, repeats)
                rows.append(dict(device=device, shape=name, dtype=dtype_name, pass_="bwd_only", atomic_ms=t_atomic,
                                 deterministic_ms=t_det, det_over_atomic=t_det / t_atomic))
                print(f"{name:9} {dtype_name:9} backward op: atomic {t_atomic:.2f} ms, deterministic {t_det:.2f} ms "
                      f"({t_det / t_atomic:.2f}x)", flush=True)
            ins = grad = None  # free before the next shape
    return rows


def check_targets(rows, device):
    print("# targets")
    ok = True
    for r in rows:
        if r["pass_"] == "bwd_only":
            good = r["det_over_atomic"] <= DET_TARGET
            print(f"#  {r['shape']}/{r['dtype']}: deterministic/atomic {r['det_over_atomic']:.2f} <= {DET_TARGET}: "
                  f"{'PASS' if good else 'FAIL'}")
            ok &= good
            continue
        if r["dtype"] != "float32" or r["speedup"] is None:
            continue
        target = CPU_TARGET if device == "cpu" else GPU_TARGET
        good = r["speedup"] >= target
        line = f"#  {r['shape']}/{r['pass_']}: {r['speedup']:.2f}x >= {target}x: {'PASS' if good else 'FAIL'}"
        if device == "cpu" and r["ours_peak_mib"] is not None and r["ref_peak_mib"] is not None:
            mem_ok = r["ours_peak_mib"] <= r["ref_peak_mib"]
            line += f"; peak {r['ours_peak_mib']:.0f} <= {r['ref_peak_mib']:.0f} MiB: {'PASS' if mem_ok else 'FAIL'}"
            good &= mem_ok
        print(line)
        ok &= good
    return ok


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES))
    p.add_argument("--passes", nargs="+", default=["fwd", "fwdbwd"], choices=["fwd", "fwdbwd"])
    p.add_argument("--repeats", type=int)
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the CPU peak-memory subprocesses")
    p.add_argument("--out")
    p.add_argument("--_memory", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._memory:
        print(measure_memory_here(*args._memory))
        return
    if args.device == "cuda" and not (torch.cuda.is_available() and instseg_ops.cuda_built()):
        sys.exit("bench_ms_deform_attn: no CUDA device or no CUDA build")
    start = time.time()
    rows = run(args)
    ok = check_targets(rows, args.device)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, threads=torch.get_num_threads(), argv=sys.argv, seconds=time.time() - start,
                device_name=torch.cuda.get_device_name() if args.device == "cuda" else os.uname().machine,
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                targets_met=ok)
    out = args.out or os.path.join(os.path.dirname(__file__), "out", f"ms_deform_attn_{args.device}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"# wrote {out} ({meta['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
