"""Per-call overhead of the Python API on tiny inputs, against torchvision.ops in the same run.

Each op is called many times on inputs so small that the kernels take a few
microseconds: what is measured is the wrapper (argument handling, dispatch).
Rounds alternate between instseg_ops and torchvision; the reported time per
call is the median over rounds (each round: the mean over ``--calls`` calls).

    .venv/bin/python benchmarks/bench_overhead.py [--threads 2] [--calls 2000] [--rounds 15]
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch
import torchvision

import instseg_ops
from instseg_ops.roi_align import boxes_to_rois


def cases():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 4, 8, 8, generator=g)
    xy = torch.rand(3, 2, generator=g) * 4
    b4 = torch.cat([xy, xy + 1 + torch.rand(3, 2, generator=g) * 3], 1)
    rois = torch.cat([torch.zeros(3, 1), b4], 1)
    feats = {"0": torch.rand(1, 4, 16, 16, generator=g), "1": torch.rand(1, 4, 8, 8, generator=g),
             "2": torch.rand(1, 4, 4, 4, generator=g), "3": torch.rand(1, 4, 2, 2, generator=g)}
    mboxes = [b4 * 8]
    shapes = [(64, 64)]
    nb = torch.rand(8, 2, generator=g) * 10
    nboxes = torch.cat([nb, nb + 1 + torch.rand(8, 2, generator=g) * 5], 1)
    scores = torch.rand(8, generator=g)
    idxs = torch.randint(0, 3, (8,), generator=g)
    ours_ra, tv_ra = instseg_ops.RoIAlign(2, 1.0, 2), torchvision.ops.RoIAlign(2, 1.0, 2)
    ours_ms = instseg_ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 2, 2)
    tv_ms = torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 2, 2)
    ops = torch.ops.instseg
    # The third entry calls the op directly with prepared arguments: the difference to the
    # first is the Python wrapper's own time (robust to the kernel's cost and to a busy machine).
    mrois = boxes_to_rois(mboxes, feats["0"])
    levels = instseg_ops.assign_levels(mrois, 2, 5)
    flist = list(feats.values())
    scales = [0.25, 0.125, 0.0625, 0.03125]
    return {
        "roi_align": (lambda: instseg_ops.roi_align(x, rois, 2, 1.0, 2),
                      lambda: torchvision.ops.roi_align(x, rois, 2, 1.0, 2),
                      lambda: ops.roi_align(x, rois, 1.0, 2, 2, 2, False, False)),
        "RoIAlign": (lambda: ours_ra(x, rois), lambda: tv_ra(x, rois),
                     lambda: ops.roi_align(x, rois, 1.0, 2, 2, 2, False, False)),
        "MultiScaleRoIAlign": (lambda: ours_ms(feats, mboxes, shapes), lambda: tv_ms(feats, mboxes, shapes),
                               lambda: ops.multilevel_roi_align(flist, mrois, levels, scales, 2, 2, 2, False, False)),
        "nms": (lambda: instseg_ops.nms(nboxes, scores, 0.5), lambda: torchvision.ops.nms(nboxes, scores, 0.5),
                lambda: ops.nms(nboxes, scores, None, 0.5, -1, None)),
        "batched_nms": (lambda: instseg_ops.batched_nms(nboxes, scores, idxs, 0.5),
                        lambda: torchvision.ops.batched_nms(nboxes, scores, idxs, 0.5),
                        lambda: ops.nms(nboxes, scores, idxs, 0.5, -1, None)),
    }


def per_call_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = {}
    with torch.inference_mode(False), torch.no_grad():
        for name, (ours, tv, direct) in cases().items():
            for f in (ours, tv, direct):  # warm up (first-call setup, caches)
                for _ in range(50):
                    f()
            times = {"instseg_ops": [], "torchvision": [], "wrapper": []}
            for _ in range(a.rounds):
                t_ours = per_call_us(ours, a.calls)
                times["instseg_ops"].append(t_ours)
                times["torchvision"].append(per_call_us(tv, a.calls))
                times["wrapper"].append(t_ours - per_call_us(direct, a.calls))
            rows[name] = {k: statistics.median(v) for k, v in times.items()}
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {a.threads} threads, "
          f"{a.calls} calls x {a.rounds} rounds, median of rounds (microseconds per call)")
    print(f"{'op':<20}{'instseg_ops':>13}{'torchvision':>13}{'wrapper':>10}   (wrapper: instseg_ops minus the bare op call)")
    for name, r in rows.items():
        print(f"{name:<20}{r['instseg_ops']:>13.1f}{r['torchvision']:>13.1f}{r['wrapper']:>10.1f}")
    if a.out:
        os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
        with open(a.out, "w") as f:
            json.dump({"threads": a.threads, "calls": a.calls, "rounds": a.rounds, "us_per_call": rows,
                       "torch": torch.__version__, "torchvision": torchvision.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
