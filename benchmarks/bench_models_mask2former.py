"""Mask2Former inference: instseg_ops.models vs transformers, same weights and inputs.

Both models are Mask2Former R50 at the reference's dimensions (pixel decoder: 3 levels, 6
deformable encoder layers; decoder: 9 layers, 100 queries; 80 classes): transformers'
``Mask2FormerForUniversalSegmentation`` built from a config with a ``ResNetConfig`` backbone
(nothing downloaded), every parameter and BatchNorm statistic re-randomised (seed 0), its state
dict loaded into ours with ``load_pretrained`` (strict). Input: one normalised random image
of --size (512x512 by default), as ``pixel_values``.

Rows (median over --repeats, after a warm-up call; the two models are timed alternately so
that a changing load on a shared machine hits both alike):
- ``end_to_end``: ``ours.logits(x)`` vs ``ref(pixel_values=x)`` (backbone, pixel decoder,
  transformer decoder, class and mask logits of every layer);
- ``pixel_decoder``: the pixel decoder alone on the same backbone features (ours on
  instseg_ops.ms_deform_attn, transformers' on grid_sample).
Ratios are transformers / ours. The largest |difference| of the final logits is printed.

Run (from the repo root):
    python benchmarks/bench_models_mask2former.py --quick   # 2 repeats
    python benchmarks/bench_models_mask2former.py           # 5 repeats
Results go to --out (default benchmarks/out/mask2former_cpu.json).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_roi_align as base  # noqa: E402  device selection, metadata, formatting

from instseg_ops.models import get_model, load_pretrained  # noqa: E402

COLUMNS = [("device", 6), ("stage", 13), ("ours_ms", 9), ("hf_ms", 9), ("speedup", 8)]


def build(device):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers
    transformers.logging.set_verbosity_error()
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    torch.manual_seed(0)
    cfg = Mask2FormerConfig(backbone_config=ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"]),
                            num_labels=80)
    ref = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.05)
        for name, b in ref.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.2)
    ours = get_model("mask2former_resnet50", num_classes=81).eval()
    load_pretrained(ours, ref.state_dict(), strict=True)
    return ours.to(device), ref.to(device)


def paired_ms(fn_a, fn_b, device, repeats):
    """Times fn_a and fn_b alternately (a, b, a, b, ...) so that a changing load on a shared
    machine hits both alike; returns (median_a, samples_a), (median_b, samples_b) in ms."""
    samples = ([], [])
    for _ in range(repeats):
        for fn, out in ((fn_a, samples[0]), (fn_b, samples[1])):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
    return tuple((statistics.median(t), t) for t in samples)


def run_device(device, args, rows):
    ours, ref = build(device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, args.size[0], args.size[1], generator=g).to(device)
    with torch.no_grad():
        c, m = ours.logits(x)  # warm-up and agreement
        out = ref(pixel_values=x)
        diff = max((c - out.class_queries_logits).abs().max().item(), (m - out.masks_queries_logits).abs().max().item())
        base.note(f"{device}: max |logit difference| ours vs transformers {diff:.2e} (mask logits up to "
                  f"{m.abs().max().item():.1f})")
        feats = list(ours.backbone(x).values())
        hf_feats = ref.model.pixel_level_module.encoder(x).feature_maps
        ours.pixel_decoder(feats)
        ref.model.pixel_level_module.decoder(hf_feats)
        timings = {
            "end_to_end": paired_ms(lambda: ours.logits(x), lambda: ref(pixel_values=x), device, args.repeats),
            "pixel_decoder": paired_ms(lambda: ours.pixel_decoder(feats),
                                       lambda: ref.model.pixel_level_module.decoder(hf_feats), device, args.repeats),
        }
    for stage, ((o, o_all), (h, h_all)) in timings.items():
        row = {"device": device, "stage": stage, "ours_ms": o, "hf_ms": h, "speedup": h / o if o else None,
               "ours_samples_ms": o_all, "hf_samples_ms": h_all, "size": args.size, "repeats": args.repeats,
               "max_logit_diff": diff, "threads": torch.get_num_threads()}
        rows.append(row)
        cells = [device, stage, base.fmt(o, ".1f"), base.fmt(h, ".1f"), base.fmt(row["speedup"], ".2f") + "x"]
        print("  ".join(cl.rjust(wd) for cl, (_, wd) in zip(cells, COLUMNS)), flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda", "all"], default="cpu")
    p.add_argument("--size", type=lambda s: [int(v) for v in s.split("x")], default=[512, 512], help="HxW")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 repeats")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 2
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import instseg_ops
    cuda_ok = torch.cuda.is_available() and instseg_ops.cuda_built()
    devices = base.devices_for(args.device, cuda_ok)
    out = args.out or os.path.join("benchmarks", "out", f"mask2former_{'_'.join(devices)}.json")
    base.run_all(dict(base.common_meta(devices), seed=0), COLUMNS, devices, run_device, args, out)


if __name__ == "__main__":
    main()
