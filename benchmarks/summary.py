"""One-screen summary of the benchmark JSON files (benchmarks/out/*.json) and the plot
benchmarks/out/summary.png: for each op and model, the speedup over its peer measured in the
same run (median over the cases run, with the smallest and largest), the correctness check
beside it, and the device each ran on.

    .venv/bin/python benchmarks/summary.py [--out-dir benchmarks/out] [--since EPOCH_SECONDS]

``--since`` skips files written before that time (scripts/main.sh passes its start time, so
that the summary shows this run only, and names the benchmarks that did not run). The table
also goes to ``summary.txt`` and, as data, to ``summary.json``.
"""
import argparse
import glob
import json
import os
import statistics
import sys
import textwrap
import time

# benchmark file stem -> (op or model, peer)
PEERS = {
    "roi_align": ("roi_align", "torchvision.ops.roi_align"),
    "multilevel": ("MultiScaleRoIAlign", "torchvision.ops.MultiScaleRoIAlign"),
    "nms": (None, "torchvision.ops"),  # nms and batched_nms rows, split by the "op" field
    "paste_masks": ("paste_masks", "torchvision's paste_masks_in_image"),
    "ms_deform_attn": ("ms_deform_attn", "grid_sample formulation (transformers, Deformable DETR)"),
    "maskrcnn": ("Mask R-CNN R50-FPN", "torchvision maskrcnn_resnet50_fpn"),
    "mask2former": ("Mask2Former R50", "transformers' Mask2FormerForUniversalSegmentation"),
    "overhead": ("per-call overhead", "torchvision.ops (tiny inputs)"),
}
SHORT_DTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
SHORT_LAYOUT = {"nchw": "NCHW", "channels_last": "NHWC"}


def _fmt_diff(v):
    return "n/a" if v is None else ("0" if v == 0 else f"{v:.1e}")


def _case(op, device, label, speedup, check_ok, diff=None):
    return {"op": op, "device": device, "label": label, "speedup": speedup, "ok": check_ok, "diff": diff}


def _peer_na(op, row, label):
    """A case only we ran (the peer does not support it, e.g. bfloat16 in torchvision's CPU
    kernels): no speedup, listed as coverage."""
    if row.get("ours_ms") is None:
        return []
    c = _case(op, row["device"], label, None, True, None)
    c["peer_na"] = row.get("dtype")
    return [c]


def cases_roi_like(stem, data):
    op = PEERS[stem][0]
    out = []
    for r in data["rows"]:
        label = (f"{SHORT_DTYPE.get(r['dtype'], r['dtype'])} {SHORT_LAYOUT.get(r['layout'], r['layout'])} "
                 f"{r['pass']} {r['output_size']}x{r['output_size']}")
        if r.get("speedup") is None:
            out += _peer_na(op, r, label)
            continue
        d = r.get("max_abs_diff")
        tol = 1e-4 if r["dtype"] in ("float32", "float64") else 5e-2
        out.append(_case(op, r["device"], label, r["speedup"], d is not None and d <= tol, d))
    return out


def cases_nms(data):
    out = []
    for r in data["rows"]:
        label = f"{SHORT_DTYPE.get(r['dtype'], r['dtype'])} N={r['num_boxes']}"
        if r["categories"]:
            label += f" C={r['categories']}"
        if r.get("speedup") is None:
            out += _peer_na(r["op"], r, label)
            continue
        out.append(_case(r["op"], r["device"], label, r["speedup"], bool(r.get("identical")), None))
    return out


def cases_paste(data):
    out = []
    for r in data["rows"]:
        label = f"{SHORT_DTYPE.get(r['dtype'], r['dtype'])} {r['case']} {r['comparison']}"
        if r.get("speedup") is None:
            out += _peer_na("paste_masks", r, label)
            continue
        d = r.get("diff")
        half = r["dtype"] in ("float16", "bfloat16")
        if "bool" in r["comparison"]:
            # d = pixels that differ over the first 10 pasted masks; float32 must agree exactly, half
            # precision may flip pixels within rounding of the 0.5 threshold (the peer computes in half,
            # ours in float32): at most 1 in 10^4 of them.
            h, w = (int(v) for v in r["case"].split("x"))
            tol = 1e-4 * 10 * h * w if half else 0.0
            c = _case("paste_masks", r["device"], label, r["speedup"], d is not None and d <= tol, None)
            c["pixels"] = d
        else:
            c = _case("paste_masks", r["device"], label, r["speedup"], d is not None and d <= (2e-3 if half else 1e-5), d)
        out.append(c)
    return out


def cases_msda(data):
    out = []
    for r in data["rows"]:
        label = f"{SHORT_DTYPE.get(r['dtype'], r['dtype'])} {r['shape']} {r['pass_']}"
        if r.get("speedup") is None:
            out += _peer_na("ms_deform_attn", r, label)
            continue
        d = r.get("max_diff")
        out.append(_case("ms_deform_attn", r["device"], label, r["speedup"], d is not None and d <= 1e-4, d))
    return out


def cases_maskrcnn(data):
    out = []
    # The detections of both models are compared once per device (recorded on its first row).
    agreement = {}
    for r in data["rows"]:
        if r.get("agreement"):
            agreement.setdefault(r["device"], r["agreement"][0])
    for r in data["rows"]:
        if r.get("speedup") is None:
            continue
        agree = agreement.get(r["device"], {})
        ok = agree.get("max_score_diff") is not None and agree["max_score_diff"] <= 1e-3
        c = _case("Mask R-CNN R50-FPN", r["device"], f"stage {r['stage']}", r["speedup"], ok, agree.get("max_score_diff"))
        c["samples"] = (r.get("ours_samples_ms"), r.get("tv_samples_ms"))
        c["agreement"] = agree
        out.append(c)
    return out


def cases_mask2former(data):
    out = []
    for r in data["rows"]:
        if r.get("speedup") is None:
            continue
        d = r.get("max_logit_diff")
        c = _case("Mask2Former R50", r["device"], f"stage {r['stage']}", r["speedup"], d is not None and d <= 1e-4, d)
        c["samples"] = (r.get("ours_samples_ms"), r.get("hf_samples_ms"))
        out.append(c)
    return out


def cases_overhead(data):
    return [_case("per-call overhead", "cpu", api, v["torchvision"] / v["instseg_ops"], True, None)
            for api, v in data["us_per_call"].items() if v.get("instseg_ops")]


# benchmark file stem -> the function turning its JSON into cases
LOADERS = {
    "roi_align": lambda data: cases_roi_like("roi_align", data),
    "multilevel": lambda data: cases_roi_like("multilevel", data),
    "nms": cases_nms,
    "paste_masks": cases_paste,
    "ms_deform_attn": cases_msda,
    "maskrcnn": cases_maskrcnn,
    "mask2former": cases_mask2former,
    "overhead": cases_overhead,
}


def load_cases(out_dir, since):
    """(cases, {stem: file}, [stems not run since ``since``])."""
    cases, used, missing = [], {}, []
    for stem in PEERS:
        files = [f for f in glob.glob(os.path.join(out_dir, f"{stem}_*.json")) if os.path.getmtime(f) >= since]
        if not files:
            missing.append(stem)
            continue
        for f in sorted(files):
            with open(f) as fh:
                data = json.load(fh)
            used.setdefault(stem, []).append(f)
            cases += LOADERS[stem](data)
    return cases, used, missing


def _peer_of(op):
    for stem, (name, peer) in PEERS.items():
        if name == op:
            return peer
    return "torchvision.ops." + op


def summarize(cases):
    """Rows of the table: one per (op, device)."""
    rows = []
    keys = []
    for c in cases:
        if (c["op"], c["device"]) not in keys:
            keys.append((c["op"], c["device"]))
    for op, device in keys:
        group = [c for c in cases if c["op"] == op and c["device"] == device]
        if op == "Mask R-CNN R50-FPN":
            rows += _maskrcnn_rows(group, device)
            continue
        if op == "Mask2Former R50":
            rows += _mask2former_rows(group, device)
            continue
        na = [c for c in group if c["speedup"] is None]
        group = [c for c in group if c["speedup"] is not None]
        coverage = ""
        if na:
            dts = sorted({SHORT_DTYPE.get(c["peer_na"], str(c["peer_na"])) for c in na})
            coverage = f"; +{len(na)} {'/'.join(dts)}: ours only (peer n/a)"
        if not group:
            rows.append({"op": op, "device": device, "peer": _peer_of(op), "cases": 0, "median": float("nan"),
                         "min": float("nan"), "max": float("nan"), "check": coverage.lstrip("; "), "all_ok": True})
            continue
        sp = [c["speedup"] for c in group]
        diffs = [c["diff"] for c in group if c["diff"] is not None]
        n_ok = sum(c["ok"] for c in group)
        if op in ("nms", "batched_nms"):
            check = f"same kept boxes in {n_ok}/{len(group)}"
        elif op == "paste_masks":
            px = [c["pixels"] for c in group if c.get("pixels") is not None]
            check = (f"max |diff| {_fmt_diff(max(diffs) if diffs else None)} (probabilities), "
                     f"{int(max(px)) if px else 'n/a'} px differ at most (binary), ok in {n_ok}/{len(group)}")
        elif op == "per-call overhead":
            check = "; ".join(f"{c['label']} {c['speedup']:.1f}x" for c in group)
        else:
            check = f"max |diff| {_fmt_diff(max(diffs) if diffs else None)}, ok in {n_ok}/{len(group)}"
        rows.append({"op": op, "device": device, "peer": _peer_of(op), "cases": len(group),
                     "median": statistics.median(sp), "min": min(sp), "max": max(sp), "check": check + coverage,
                     "all_ok": n_ok == len(group)})
    return rows


def _maskrcnn_rows(group, device):
    rows = []
    by = {c["label"]: c for c in group}
    for stage, name in (("stage total", "Mask R-CNN R50-FPN, end to end"),
                        ("stage post_backbone", "Mask R-CNN, after the backbone")):
        c = by.get(stage)
        if c is None:
            continue
        lo, hi, n = _spread(c)
        a = c["agreement"]
        check = (f"{a.get('ours', '?')} vs {a.get('torchvision', '?')} detections, "
                 f"{100 * a.get('match_fraction', 0):.0f}% same box, max |score diff| "
                 f"{_fmt_diff(a.get('max_score_diff'))}")
        rows.append({"op": name, "device": device, "peer": PEERS["maskrcnn"][1], "cases": n,
                     "median": c["speedup"], "min": lo, "max": hi, "check": check, "all_ok": c["ok"],
                     "spread_over": "repeats" if n > 1 else "a single median"})
    return rows


def _spread(c):
    """(lowest, highest) speedup over the repeats: the slowest of ours against the fastest peer and back."""
    ours, peer = c["samples"]
    if ours and peer:
        return min(peer) / max(ours), max(peer) / min(ours), len(ours)
    return c["speedup"], c["speedup"], 1


def _mask2former_rows(group, device):
    rows = []
    for c in group:
        lo, hi, n = _spread(c)
        name = {"stage end_to_end": "Mask2Former R50, end to end", "stage pixel_decoder": "Mask2Former, pixel decoder"}
        rows.append({"op": name.get(c["label"], "Mask2Former " + c["label"]), "device": device,
                     "peer": PEERS["mask2former"][1], "cases": n, "median": c["speedup"], "min": lo, "max": hi,
                     "check": f"same weights, 512x512: max |logit diff| {_fmt_diff(c['diff'])}", "all_ok": c["ok"],
                     "spread_over": "repeats"})
    return rows


def render(rows, missing, meta, demo):
    lines = [f"instseg_ops against its peers, measured in this run ({meta.get('date', '?')}, commit "
             f"{(meta.get('commit') or '?')[:7]}; torch {meta.get('torch', '?')}, {meta.get('num_threads', '?')} threads)"]
    lines.append("devices: " + ", ".join(f"{k} = {v}" for k, v in (meta.get("devices") or {}).items())
                 + ("" if "cuda" in (meta.get("devices") or {}) else "; no CUDA device: GPU rows not run"))
    lines.append("")
    head = f"{'op / model':<32} {'dev':<4} {'cases':>5} {'speedup: median [min - max]':>28}  check against the peer"
    lines.append(head)
    lines.append("-" * len(head))
    first_row = len(lines)
    for r in rows:
        sp = f"{r['median']:6.2f}x [{r['min']:.2f}x - {r['max']:.2f}x]"
        flag = "" if r["all_ok"] else "  <-- CHECK FAILED"
        lines.append(f"{r['op']:<32} {r['device']:<4} {r['cases']:>5} {sp:>28}  {r['check']}{flag}")
    lines.append("")
    lines.append("peers: " + "; ".join(f"{r['op']}: {r['peer']}" for r in rows if r["op"] in
                                       ("roi_align", "MultiScaleRoIAlign", "paste_masks", "ms_deform_attn",
                                        "Mask2Former R50, end to end")))
    lines.append("speedup = peer time / our time, same inputs, same process; [min - max] over the cases run "
                 "(dtypes, layouts, passes, sizes), for the models over the repeats (random weights, "
                 "same state dict; Mask R-CNN's same box: same label and box IoU > 0.99)")
    if missing:
        lines.append("not run in this run: " + ", ".join(missing))
    if demo:
        lines.append(f"demo: the shipped Mask R-CNN found {demo['found']}/{demo['objects']} objects on "
                     f"{demo['images']} fresh images (right class, mask IoU >= 0.5, mean {demo['mean_mask_iou']:.2f}), "
                     f"{demo['seconds_per_image']:.2f} s per image; picture: {demo.get('out', 'demo.png')}")
    table = set(range(first_row - 2, first_row + len(rows)))  # header, rule and rows are never wrapped
    return "\n".join(w for i, line in enumerate(lines)
                     for w in ([line] if i in table or len(line) <= 120 else textwrap.wrap(line, 120, subsequent_indent="  ")))


def plot(cases, path):
    """Horizontal bars, one per case, grouped by op, log scale, a line at 1x."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = [c for c in cases if c["speedup"] is not None and
             (c["op"] != "Mask R-CNN R50-FPN" or c["label"] in ("stage total", "stage post_backbone"))]
    names = {"stage total": "end to end", "stage post_backbone": "after the backbone", "stage end_to_end": "end to end",
             "stage pixel_decoder": "pixel decoder"}
    cases = [dict(c, label=names.get(c["label"], c["label"])) for c in cases]
    ops = []
    for c in cases:
        if c["op"] not in ops:
            ops.append(c["op"])
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(10, 0.22 * len(cases) + 1.6))
    y, labels, ticks = 0, [], []
    for i, op in enumerate(ops):
        for c in [c for c in cases if c["op"] == op]:
            ax.barh(y, c["speedup"], color=cmap(i % 10), height=0.8)
            ax.text(c["speedup"] * 1.03, y, f"{c['speedup']:.1f}x", va="center", fontsize=6.5)
            labels.append(f"{op}{'' if c['device'] == 'cpu' else ' [' + c['device'] + ']'}: {c['label']}")
            ticks.append(y)
            y -= 1
        y -= 0.6
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=6.5)
    ax.set_xlabel("speedup over the peer (peer time / instseg_ops time), log scale; 1x = as fast")
    hi = max([c["speedup"] for c in cases] + [2.0])
    lo = min([c["speedup"] for c in cases] + [1.0])
    ax.set_xlim(min(0.5, lo * 0.8), hi * 2.0)
    ax.grid(axis="x", which="both", linewidth=0.3, alpha=0.5)
    ax.set_title("instseg_ops against torchvision and the other peers, measured in one run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", default=os.path.join("benchmarks", "out"))
    p.add_argument("--since", type=float, default=0.0, help="skip JSON files written before this Unix time")
    p.add_argument("--demo", default=None, help="the demo's JSON summary (demo --json), shown under the table")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    cases, used, missing = load_cases(args.out_dir, args.since)
    if not cases:
        sys.exit(f"no benchmark results in {args.out_dir} (since {time.ctime(args.since)}): run scripts/main.sh")
    meta = {}
    for stem in ("roi_align", "multilevel", "nms", "maskrcnn"):
        for f in used.get(stem, []):
            with open(f) as fh:
                meta = json.load(fh).get("meta", {})
            break
        if meta:
            break
    demo = None
    if args.demo and os.path.exists(args.demo) and os.path.getmtime(args.demo) >= args.since:
        with open(args.demo) as fh:
            demo = json.load(fh)
    rows = summarize(cases)
    text = render(rows, missing, meta, demo)
    print(text)
    with open(os.path.join(args.out_dir, "summary.txt"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(args.out_dir, "summary.json"), "w") as fh:
        json.dump({"meta": meta, "rows": rows, "cases": [{k: v for k, v in c.items() if k != "samples"} for c in cases],
                   "not_run": missing, "demo": demo}, fh, indent=1, default=str)
    if not args.no_plot:
        png = os.path.join(args.out_dir, "summary.png")
        plot(cases, png)
        print(f"plot: {png}")
    if not all(r["all_ok"] for r in rows):
        sys.exit(1)
    return 0


if __name__ == "__main__":
    main()
