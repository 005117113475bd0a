"""A small workload of every CUDA op for compute-sanitizer (memcheck / racecheck / initcheck / synccheck).

Runs forward, default backward and deterministic backward for every dtype and
layout on a map with odd sizes, boxes partly and wholly outside, degenerate,
NaN/inf and huge boxes. Exits non-zero if anything is non-finite.
"""
import torch

import instseg_ops


def main():
    torch.manual_seed(0)
    dev = "cuda"
    nan, inf = float("nan"), float("inf")
    rois = torch.tensor([
        [0, 1.0, 2.0, 20.0, 15.0],
        [1, -10.0, -10.0, 5.0, 5.0],
        [1, 30.0, 40.0, 90.0, 80.0],
        [0, 50.0, 50.0, 40.0, 40.0],   # x2 < x1
        [0, 3.0, 3.0, 3.0, 3.0],       # empty
        [1, nan, 0.0, 4.0, 4.0],
        [0, -inf, -inf, inf, inf],
        [1, -1e30, -1e30, 1e30, 1e30],
        [0, 0.0, 0.0, 34.0, 26.0],     # the whole map
    ], device=dev)
    bad = 0
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        for cl in (False, True):
            x = torch.randn(2, 19, 13, 17, device=dev, dtype=dtype)
            if cl:
                x = x.contiguous(memory_format=torch.channels_last)
            for aligned in (False, True):
                for det in (False, True):
                    xg = x.clone().requires_grad_()
                    out = instseg_ops.roi_align(xg, rois.to(dtype if dtype == torch.float64 else torch.float32),
                                                (5, 3), 0.5, -1, aligned, deterministic=det)
                    out.backward(torch.randn_like(out))
                    torch.cuda.synchronize()
                    if not (torch.isfinite(out).all() and torch.isfinite(xg.grad).all()):
                        print("non-finite result", dtype, cl, aligned, det)
                        bad += 1
    # Multi-level: four levels, some invalid level indices (zeros, no sync).
    feats = [torch.randn(2, 19, 52 // s, 68 // s, device=dev) for s in (1, 2, 4, 8)]
    levels = torch.tensor([0, 1, 2, 3, 0, 9, -1, 2, 1], device=dev)
    for cl in (False, True):
        for det in (False, True):
            xs = [(f.contiguous(memory_format=torch.channels_last) if cl else f).requires_grad_() for f in feats]
            out = torch.ops.instseg.multilevel_roi_align(xs, rois, levels, [1.0, 0.5, 0.25, 0.125], 7, 7, 2, True, det)
            out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            if not (torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in xs)):
                print("non-finite multilevel result", cl, det)
                bad += 1
    # NMS, batched NMS (several mask chunks are not needed for the sanitizer) and Soft-NMS.
    g = torch.Generator(device="cpu").manual_seed(1)
    xy = torch.rand(3000, 2, generator=g) * 500
    boxes = torch.cat([xy, xy + torch.rand(3000, 2, generator=g) * 60 + 1], 1).to(dev)
    scores = torch.rand(3000, generator=g).to(dev)
    scores[7] = nan
    idxs = torch.randint(0, 20, (3000,), generator=g).to(dev)
    cpu_keep = instseg_ops.batched_nms(boxes.cpu(), scores.cpu(), idxs.cpu(), 0.5)
    if not torch.equal(instseg_ops.batched_nms(boxes, scores, idxs, 0.5).cpu(), cpu_keep):
        print("batched_nms differs from the CPU")
        bad += 1
    instseg_ops.nms(boxes.half(), scores.half(), 0.5, max_output=100)
    instseg_ops.soft_nms(boxes[:500], scores[:500], method="gaussian")
    # Mask pasting: both modes, probabilities, threshold and crops, odd sizes, NaN/huge boxes.
    masks = torch.rand(9, 13, 13, device=dev)
    pboxes = rois[:, 1:].clone()
    for dtype in (torch.float32, torch.float16, torch.float64):
        for aligned in (False, True):
            for thr in (None, 0.5):
                canvas = instseg_ops.paste_masks(masks.to(dtype), pboxes, (37, 29), 1, thr, aligned)
                crops, _ = instseg_ops.paste_masks_crops(masks.to(dtype), pboxes, (37, 29), 1, thr, aligned)
                ref = instseg_ops.paste_masks(masks.to(dtype).cpu(), pboxes.cpu(), (37, 29), 1, thr, aligned)
                if not torch.equal(canvas.cpu(), ref):
                    print("paste_masks differs from the CPU", dtype, aligned, thr)
                    bad += 1
    torch.cuda.synchronize()
    print("sanitizer case done, problems:", bad)
    raise SystemExit(1 if bad else 0)


if __name__ == "__main__":
    main()
