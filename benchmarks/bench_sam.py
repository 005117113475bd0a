"""Benchmark SAM's automatic mask generator (``instseg_ops.models.sam``) against the official
``segment_anything`` one with the same weights, and the mask ops against their references.

AMG end to end (CPU): the tiny configuration (``sam_vit_tiny``; 256-px input) with random
weights, every tensor re-randomised (seed 0) and the hypernetworks' last layer scaled so that
mask logits are a few units (a random model otherwise has stability scores near 0), copied
into both models. Image: a generated 384x512 RGB picture of random flat-coloured discs and
rectangles (seed 0; 768x1024 with ``--config 1024``). Generators: points_per_side 16 (256 points), points_per_batch 64, the
official defaults otherwise; two settings: ``defaults`` (pred_iou_thresh 0.88,
stability_score_thresh 0.95) and ``loose`` (IoU threshold at the median predicted IoU of the
grid, stability 0.7, box NMS 1.0: many more masks survive to the end). Each side runs in its
own subprocess: one warm-up ``generate``, then the median of --repeats timed calls; peak
memory = the peak RSS over these calls (VmHWM reset just before the first, see
``peak_memory.py``) minus the RSS before the first ``generate``. The
two outputs are compared (count, and every mask's crop box, point, area and segmentation).

Ops alone (CPU, 64 random 512x512 masks, ours and the reference timed alternately, outputs
checked equal first): ``masks_to_rle`` vs segment-anything's ``mask_to_rle_pytorch`` (a
Python loop over masks); ``masks_to_boxes`` vs ``batched_mask_to_box`` and torchvision's
``masks_to_boxes``; ``stability_score_and_boxes`` (one pass over the logits) vs
``calculate_stability_score`` plus ``batched_mask_to_box(logits > 0)``;
``connected_components`` vs ``scipy.ndimage.label`` or OpenCV's
``connectedComponentsWithStats`` when installed (else only ours is timed). ``--ops-only``
runs only these.

``--config 1024``: the official 1024-px input and 256-wide decoder with a 2-block 96-wide
encoder (vit_b/l/h's decoder, upsampling and post-processing costs without their encoder).
``--config vit_b``: SAM ViT-B itself (random weights), 768x1024 image.

Ours uses the factored decoder (``FactoredMaskDecoder``) unless ``--exact-decoder``; ``--sides``
chooses which generators run (``official,ours``; the pair is compared only when both ran).

Run: PYTHONPATH=. python benchmarks/bench_sam.py [--config tiny|1024|vit_b] [--repeats 3] [--settings defaults,loose]
     [--ops-only | --no-ops] [--exact-decoder] [--sides official,ours]
"""
import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peak_memory import PeakRSS  # noqa: E402


def shapes_image(seed, h, w):
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.uint8) + rng.integers(0, 256, 3).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for _ in range(12):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(10, 60)
        col = rng.integers(0, 256, 3)
        if rng.random() < 0.5:
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = col
        else:
            img[max(0, cy - r):cy + r, max(0, cx - r):cx + r] = col
    return img


CONFIGS = {
    "tiny": {},   # TINY_CONFIG: 256-px input, 64-wide decoder
    # the official 1024-px input and 256-wide decoder with a 2-block, 96-wide encoder: the
    # decoder, upsampling and post-processing costs of vit_b/l/h, a cheap encoder
    "1024": dict(encoder_embed_dim=96, encoder_depth=2, encoder_num_heads=3, encoder_global_attn_indexes=(1,),
                 img_size=1024, patch_size=16, window_size=14, prompt_embed_dim=256, decoder_depth=2,
                 decoder_mlp_dim=2048, decoder_num_heads=8, mask_in_chans=16, iou_head_hidden_dim=256),
    # SAM ViT-B as the official builder makes it (random weights)
    "vit_b": dict(encoder_embed_dim=768, encoder_depth=12, encoder_num_heads=12, encoder_global_attn_indexes=(2, 5, 8, 11),
                  img_size=1024, patch_size=16, window_size=14, prompt_embed_dim=256, decoder_depth=2,
                  decoder_mlp_dim=2048, decoder_num_heads=8, mask_in_chans=16, iou_head_hidden_dim=256),
}
CONFIG = {}


def image_hw():
    return (768, 1024) if CONFIG.get("img_size") == 1024 else (384, 512)


def build_ours():
    from instseg_ops.models import get_model
    return get_model("sam_vit_tiny", **CONFIG)


def random_state_dict(seed=0):
    model = build_ours()
    g = torch.Generator().manual_seed(seed)
    sd = model.state_dict()
    for name, t in sd.items():
        if name.endswith("positional_encoding_gaussian_matrix"):
            t.copy_(torch.randn(t.shape, generator=g))
        elif t.dim() == 1 and "norm" in name and name.endswith("weight"):
            t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
        else:
            fan_in = t[0].numel() if t.dim() > 1 else 16
            t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
            if "output_hypernetworks_mlps" in name and ".layers.2." in name:
                t.mul_(20)
    return sd


def official_model(sd):
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from instseg_ops.models.sam.model import TINY_CONFIG
    c = {**TINY_CONFIG, **CONFIG}
    grid = c["img_size"] // c["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=c["encoder_depth"], embed_dim=c["encoder_embed_dim"], img_size=c["img_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=c["encoder_num_heads"],
            patch_size=c["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=c["encoder_global_attn_indexes"], window_size=c["window_size"],
            out_chans=c["prompt_embed_dim"]),
        prompt_encoder=PromptEncoder(embed_dim=c["prompt_embed_dim"], image_embedding_size=(grid, grid),
                                     input_image_size=(c["img_size"], c["img_size"]),
                                     mask_in_chans=c["mask_in_chans"]),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=c["decoder_depth"], embedding_dim=c["prompt_embed_dim"], mlp_dim=c["decoder_mlp_dim"],
            num_heads=c["decoder_num_heads"]), transformer_dim=c["prompt_embed_dim"], iou_head_depth=3,
            iou_head_hidden_dim=c["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
    sam.load_state_dict(sd)
    return sam


def _run_side(side, sd_path, kwargs, repeats, threads, config, exact, conn):
    torch.set_num_threads(threads)
    CONFIG.update(config)
    sd = torch.load(sd_path)
    if side == "official":
        import segment_anything as sa
        gen = sa.SamAutomaticMaskGenerator(official_model(sd), **kwargs)
    else:
        from instseg_ops.models.sam import SamAutomaticMaskGenerator
        model = build_ours()
        model.load_state_dict(sd)
        gen = SamAutomaticMaskGenerator(model, **kwargs, exact_decoder=exact)
    image = shapes_image(0, *image_hw())
    with PeakRSS() as peak:
        out = gen.generate(image)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = gen.generate(image)
            times.append(time.perf_counter() - t)
    summary = sorted((tuple(a["crop_box"]), tuple(a["point_coords"][0]), a["area"],
                      np.packbits(a["segmentation"]).tobytes()) for a in out)
    conn.send({"ms": 1000 * statistics.median(times), "peak_mb": float("nan") if peak.mb is None else peak.mb, "masks": len(out),
               "summary": summary})


def compare(want, got):
    """"identical" (same masks, crop boxes, points, areas, bits), or how they differ."""
    if want is None or got is None:
        return None
    if want == got:
        return "identical"
    if len(want) != len(got):
        return f"{len(got)} masks vs {len(want)}"
    keys = sum(w[:2] != g[:2] for w, g in zip(want, got))
    pixels = [int(np.unpackbits(np.frombuffer(w[3], np.uint8) ^ np.frombuffer(g[3], np.uint8)).sum())
              for w, g in zip(want, got)]
    return (f"{keys} masks from other points; {sum(p > 0 for p in pixels)} masks differ in "
            f"{sum(pixels)} pixels (at most {max(pixels)} in one)")


def run_side(side, sd_path, kwargs, repeats, threads, exact=False):
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=_run_side, args=(side, sd_path, kwargs, repeats, threads, dict(CONFIG), exact, b))
    p.start()
    res = a.recv()
    p.join()
    return res


def median_iou(sd, points_per_side):
    from instseg_ops.models.sam import SamPredictor
    from instseg_ops.models.sam.amg import build_point_grid
    model = build_ours()
    model.load_state_dict(sd)
    p = SamPredictor(model)
    image = shapes_image(0, *image_hw())
    p.set_image(image)
    pts = build_point_grid(points_per_side) * np.array(image.shape[:2])[None, ::-1]
    _, iou, _ = p.predict_torch(torch.as_tensor(p.transform.apply_coords(pts, image.shape[:2]))[:, None],
                                torch.ones(len(pts), 1, dtype=torch.int))
    return float(iou.median())


def time_fn(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return 1000 * statistics.median(ts)


def time_pair(ours, ref, repeats):
    """Medians (ms) of ours and of the reference, timed alternately (one call of each per
    repeat, after one warm-up of each), so that a load change hits both alike."""
    ours()
    ref()
    t_ours, t_ref = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        ref()
        t_ref.append(time.perf_counter() - t)
        t = time.perf_counter()
        ours()
        t_ours.append(time.perf_counter() - t)
    return 1000 * statistics.median(t_ours), 1000 * statistics.median(t_ref)


def _op_row(op, ours_fn, ref_name, ref_fn, repeats):
    if ref_fn is None:
        return {"op": op, "ours_ms": time_fn(ours_fn, repeats), "reference": None, "reference_ms": None}
    ours, ref = time_pair(ours_fn, ref_fn, repeats)
    return {"op": op, "ours_ms": ours, "reference": ref_name, "reference_ms": ref, "speedup": ref / ours}


def bench_ops(repeats):
    """The mask ops alone on 64 random 512x512 masks (blobs, about 40% set), CPU, each against
    its reference with the outputs checked equal first."""
    import instseg_ops
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 1, 32, 32, generator=g)
    smooth = torch.nn.functional.interpolate(noise, (512, 512), mode="bilinear", align_corners=False)[:, 0]
    masks = smooth > 0.6
    logits = (smooth - 0.6) * 20   # mask logits of a few units
    try:
        from segment_anything.utils import amg as sam_amg
    except ImportError:
        sam_amg = None
    rows = []
    ref = None
    if sam_amg is not None:
        assert sam_amg.mask_to_rle_pytorch(masks) == instseg_ops.masks_to_rle(masks)
        ref = lambda: sam_amg.mask_to_rle_pytorch(masks)  # noqa: E731
    rows.append(_op_row("masks_to_rle 64x512x512", lambda: instseg_ops.masks_to_rle(masks),
                        "segment_anything mask_to_rle_pytorch", ref, repeats))
    ref = None
    if sam_amg is not None:
        assert torch.equal(sam_amg.batched_mask_to_box(masks), instseg_ops.masks_to_boxes(masks))
        ref = lambda: sam_amg.batched_mask_to_box(masks)  # noqa: E731
    rows.append(_op_row("masks_to_boxes 64x512x512", lambda: instseg_ops.masks_to_boxes(masks),
                        "segment_anything batched_mask_to_box", ref, repeats))
    try:
        import torchvision
        assert torch.equal(torchvision.ops.masks_to_boxes(masks), instseg_ops.masks_to_boxes_torchvision(masks))
        rows.append(_op_row("masks_to_boxes 64x512x512 (float32 boxes)",
                            lambda: instseg_ops.masks_to_boxes_torchvision(masks),
                            "torchvision.ops.masks_to_boxes", lambda: torchvision.ops.masks_to_boxes(masks), repeats))
    except ImportError:
        pass
    ref = None
    if sam_amg is not None:
        def ref():
            return sam_amg.calculate_stability_score(logits, 0.0, 1.0), sam_amg.batched_mask_to_box(logits > 0.0)
        got, want = instseg_ops.stability_score_and_boxes(logits, 0.0, 1.0), ref()
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    rows.append(_op_row("stability_score_and_boxes 64x512x512 f32",
                        lambda: instseg_ops.stability_score_and_boxes(logits, 0.0, 1.0),
                        "calculate_stability_score + batched_mask_to_box(logits > 0)", ref, repeats))
    ref_name, ref = None, None
    np_masks = masks.numpy()
    try:
        import scipy.ndimage as ndi
        ref_name = "scipy.ndimage.label (labels only)"
        structure = np.ones((3, 3))
        ref = lambda: [ndi.label(m, structure=structure) for m in np_masks]  # noqa: E731
        labels = instseg_ops.connected_components(masks, 8)[0].numpy()
        assert all(np.array_equal(ndi.label(m, structure=structure)[0], lab) for m, lab in zip(np_masks, labels))
    except ImportError:
        try:
            import cv2
            ref_name = "cv2.connectedComponentsWithStats"
            ref = lambda: [cv2.connectedComponentsWithStats(m.astype(np.uint8), 8) for m in np_masks]  # noqa: E731
        except ImportError:
            pass
    rows.append(_op_row("connected_components 64x512x512", lambda: instseg_ops.connected_components(masks, 8),
                        ref_name, ref, repeats))
    return rows


def bench_amg(args):
    """The AMG end to end, official vs ours, each side in its own subprocess."""
    sd = random_state_dict(0)
    sd_path = args.out + ".weights.pt"
    torch.save(sd, sd_path)
    settings = {
        "defaults": dict(points_per_side=args.points_per_side),
        "loose": dict(points_per_side=args.points_per_side, pred_iou_thresh=median_iou(sd, args.points_per_side),
                      stability_score_thresh=0.7, box_nms_thresh=1.0),
    }
    rows = []
    print(f"{'setting':10} {'official ms':>12} {'ours ms':>10} {'speedup':>8} {'off MB':>8} {'ours MB':>8} "
          f"{'masks':>6} identical")
    for name, kw in settings.items():
        if name not in args.settings.split(","):
            continue
        sides = args.sides.split(",")
        nothing = {"ms": float("nan"), "peak_mb": float("nan"), "masks": -1, "summary": None}
        off = run_side("official", sd_path, kw, args.repeats, args.threads) if "official" in sides else nothing
        ours = run_side("ours", sd_path, kw, args.repeats, args.threads, args.exact_decoder) \
            if "ours" in sides else nothing
        same = compare(off["summary"], ours["summary"])
        row = {"setting": name, "kwargs": kw, "official_ms": off["ms"], "ours_ms": ours["ms"],
               "speedup": off["ms"] / ours["ms"], "official_peak_mb": off["peak_mb"], "ours_peak_mb": ours["peak_mb"],
               "masks": ours["masks"], "official_masks": off["masks"], "identical": same}
        rows.append(row)
        print(f"{name:10} {off['ms']:12.1f} {ours['ms']:10.1f} {row['speedup']:8.2f} {off['peak_mb']:8.1f} "
              f"{ours['peak_mb']:8.1f} {ours['masks']:6d} {same}")
    os.remove(sd_path)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--settings", default="defaults,loose")
    ap.add_argument("--no-ops", action="store_true")
    ap.add_argument("--ops-only", action="store_true", help="only the mask ops against their references")
    ap.add_argument("--out", default=None)
    ap.add_argument("--exact-decoder", action="store_true", help="ours with the plain MaskDecoder")
    ap.add_argument("--sides", default="official,ours")
    args = ap.parse_args()
    CONFIG.update(CONFIGS[args.config])
    args.out = args.out or f"benchmarks/out/sam_cpu_{'ops' if args.ops_only else args.config}.json"
    torch.set_num_threads(args.threads)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = []
    if not args.ops_only:
        rows = bench_amg(args)
    ops = [] if args.no_ops else bench_ops(args.repeats)
    for r in ops:
        ref = "n/a" if r["reference_ms"] is None else f"{r['reference_ms']:.1f} ms ({r['speedup']:.2f}x)"
        print(f"{r['op']:44} ours {r['ours_ms']:7.1f} ms   {r['reference'] or 'no reference installed'}: {ref}")
    meta = {"torch": torch.__version__, "threads": args.threads, "cpu": platform.processor() or platform.machine(),
            "points_per_side": args.points_per_side, "config": args.config, "repeats": args.repeats,
            "ops_only": args.ops_only,
            "exact_decoder": args.exact_decoder,
            "image": f"{image_hw()[0]}x{image_hw()[1]} shapes, seed 0"}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "amg": rows, "ops": ops}, f, indent=1)


if __name__ == "__main__":
    main()
