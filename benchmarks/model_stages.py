"""What the model benchmarks share: a per-stage clock, Mask R-CNN's stages through our
modules, the timing loop that alternates two models (stages, then a whole ``model(images)``
call) and the common command-line options."""
import argparse
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from tqdm import tqdm


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


class StageClock:
    """Milliseconds per named stage, synchronising CUDA at each boundary."""

    def __init__(self, device):
        self.device, self.ms = device, {}
        sync(device)
        self.t0 = time.perf_counter()

    def mark(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.ms[name] = (now - self.t0) * 1e3
        self.t0 = now


def maskrcnn_stages(m, imgs, device, split_detector: bool = True):
    """Our Mask R-CNN, stage by stage: ``backbone`` (transform, body, FPN), ``rpn`` and ``box``
    (the box stage and its postprocessing), or both as ``detector`` when not
    ``split_detector``, ``mask`` (the mask stage on the detections), ``paste``. Returns the
    stage times and the detections."""
    rh = m.roi_heads
    clock = StageClock(device)
    orig = [tuple(i.shape[-2:]) for i in imgs]
    batch, sizes, _ = m.transform(imgs)
    feats = m.backbone(batch)
    clock.mark("backbone")
    props, _ = m.rpn(tuple(batch.shape[-2:]), sizes, feats)
    if split_detector:
        clock.mark("rpn")
    dets, _ = rh._forward_box(feats, props, sizes, None)
    clock.mark("box" if split_detector else "detector")
    dets = rh.forward_with_given_boxes(feats, dets, sizes)
    clock.mark("mask")
    out = m.transform.postprocess(dets, sizes, orig)
    clock.mark("paste")
    return clock.ms, out


def time_models(models: Sequence[Tuple[str, Callable, torch.nn.Module]], imgs, device, repeats: int,
                stages: Sequence[str], desc: str = "") -> Dict[str, Dict[str, List[float]]]:
    """``repeats`` rounds over ``models`` ((name, stage function, model), in this order each
    round): the stage function's times, then one whole ``model(imgs)`` call as ``total``.
    Returns ``{name: {stage: [ms per round]}}``. Call it under ``torch.no_grad()``."""
    per = {name: {s: [] for s in stages} for name, _, _ in models}
    for _ in tqdm(range(repeats), desc=desc or f"{device}: repeats", leave=False, disable=None):
        for name, fn, model in models:
            t, _ = fn(model, imgs, device)
            for s, v in t.items():
                per[name][s].append(v)
            sync(device)
            t0 = time.perf_counter()
            model(imgs)
            sync(device)
            per[name]["total"].append((time.perf_counter() - t0) * 1e3)
    return per


def add_run_args(p: argparse.ArgumentParser, images: int, repeats: int = 5) -> None:
    """--images, --repeats, --quick (1 image, 3 repeats) and --out; apply ``finish_args``."""
    p.add_argument("--images", type=int, default=images)
    p.add_argument("--repeats", type=int, default=repeats)
    p.add_argument("--quick", action="store_true", help="1 image, 3 repeats")
    p.add_argument("--out", default=None)


def finish_args(args):
    if args.quick:
        args.images, args.repeats = 1, 3
    return args
