"""Train a registered model on a COCO-format instance segmentation data set.

    python -m instseg_ops.models.train --preset shapes_r18_fast_cpu --data DIR --out RUN_DIR \\
        [--model-arg NAME=VALUE] [--iters N] [--batch-size B] [--lr LR] [--eval-every K] [--resume] [--amp] \\
        [--clip-grad X] [--workers W] [--device cpu|cuda] [--seed S] [--threads T]

Multi-process (DDP): ``torchrun --nproc_per_node P -m instseg_ops.models.train ...`` (gloo on
CPU, nccl on CUDA). RUN_DIR receives ``metrics.jsonl`` (one JSON object per iteration: iter,
losses, lr, times; evaluation records with COCO bbox/segm AP), ``checkpoint_NNNNNNN.pth`` every
checkpoint period (``last_checkpoint`` names the newest) and ``model_final.pth``; ``--resume``
continues exactly where a run stopped. The loop itself is ``instseg_ops.models.engine``.
"""
import argparse
import ast
import sys
from typing import Any, Dict, Tuple

import torch
import torch.distributed as dist

from .engine.hooks import check_scale_schedule
from .engine.presets import Preset, get_preset, preset_names
from .engine.solver import OPTIMIZERS
from .engine.trainer import train


def parse_scale_schedule(text: str) -> Tuple[Tuple[float, float], ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        out = tuple((float(f), float(v)) for f, v in (part.split(":") for part in text.split(",")))
        check_scale_schedule(out)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad scale schedule {text!r} (want FRACTION:SCALE[,...]): {e}")
    return out


def parse_minutes(text: str) -> Tuple[float, ...]:
    try:
        out = tuple(float(m) for m in text.split(",") if m.strip())
    except ValueError:
        out = ()
    if not out or any(m <= 0 for m in out):
        raise argparse.ArgumentTypeError(f"bad minutes {text!r} (want positive numbers, e.g. 30 or 15,30)")
    return out


def parse_model_arg(text: str) -> Tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip().isidentifier():
        raise argparse.ArgumentTypeError(f"bad model argument {text!r} (want NAME=VALUE, e.g. fcos_convs=4)")
    try:
        parsed = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        parsed = value.strip()  # a bare word: a string
    return key.strip(), parsed


def parse_lr_multiplier(text: str) -> Tuple[str, float]:
    try:
        prefix, factor = text.split("=")
        return prefix.strip(), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad learning-rate multiplier {text!r} (want PREFIX=FACTOR, "
                                         "e.g. backbone=0.1)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m instseg_ops.models.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, choices=preset_names())
    p.add_argument("--data", required=True, help="data directory (train/val images and COCO annotations)")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints, model_final.pth")
    p.add_argument("--model-arg", type=parse_model_arg, action="append", metavar="NAME=VALUE",
                   help="override a keyword argument of the preset's model builder (repeatable; VALUE is a Python "
                        "literal, e.g. fcos_convs=4 or norm=gn)")
    p.add_argument("--iters", type=int, help="total iterations (milestones scale with it)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="SGD with momentum, or AdamW")
    p.add_argument("--weight-decay", type=float, help="weight decay (not on normalisation parameters and biases)")
    p.add_argument("--lr-mult", type=parse_lr_multiplier, action="append", metavar="PREFIX=FACTOR",
                   help="multiply the learning rate of parameters whose name starts with PREFIX by FACTOR "
                        "(repeatable; the longest matching prefix wins), e.g. backbone=0.1")
    p.add_argument("--schedule", choices=["step", "cosine"],
                   help="learning rate after warmup: step decay at the milestones, or cosine to 0 at --iters")
    p.add_argument("--warmup", type=int, help="linear warmup iterations")
    p.add_argument("--time-budget", type=float,
                   help="train for this many minutes of wall time, final evaluation included (--iters is then an "
                        "upper bound); the learning rate decays as the preset's budget_milestones fractions pass")
    p.add_argument("--scale-schedule", type=parse_scale_schedule,
                   help="progressive resizing: FRACTION:SCALE[,FRACTION:SCALE...] trains at SCALE times the "
                        "image size until FRACTION of the run (of the time budget, else of --iters) has passed, "
                        "e.g. 0.6:0.75; 'none' trains at full size throughout")
    p.add_argument("--eval-every", type=int, help="evaluate every K iterations (0: only at the end)")
    p.add_argument("--eval-at-minutes", type=parse_minutes, metavar="M[,M...]",
                   help="also evaluate on all val images once M minutes of wall time have passed, e.g. 30 in a "
                        "60-minute run (the evaluation's time counts)")
    p.add_argument("--eval-images", type=int, help="periodic evaluations use the first N val images (0: all)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every K iterations (0: only the final one)")
    p.add_argument("--keep-checkpoints", type=int, default=3,
                   help="periodic checkpoints kept (0: all); model_final.pth is always written")
    p.add_argument("--log-every", type=int, help="print a progress line every K iterations")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--resume-from", help="continue from this checkpoint file")
    p.add_argument("--amp", action="store_true", default=None,
                   help="mixed precision (CUDA: float16 + GradScaler; CPU: bfloat16 autocast)")
    p.add_argument("--no-amp", dest="amp", action="store_false")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to X (0: no clipping)")
    p.add_argument("--workers", type=int, help="data loader worker processes")
    p.add_argument("--cache-data", action="store_true", default=None,
                   help="keep decoded images and masks in memory (default: the preset's choice)")
    p.add_argument("--no-cache-data", dest="cache_data", action="store_false")
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch intra-op CPU threads per process (default: torch's choice)")
    return p.parse_args(argv)


def preset_from_args(args) -> Preset:
    clip = args.clip_grad
    overrides = dict(iters=args.iters, batch_size=args.batch_size, lr=args.lr, schedule=args.schedule,
                     optimizer=args.optimizer, weight_decay=args.weight_decay,
                     warmup_iters=args.warmup, time_budget=args.time_budget, eval_period=args.eval_every,
                     eval_images=args.eval_images, eval_at_minutes=args.eval_at_minutes,
                     checkpoint_period=args.checkpoint_every, log_period=args.log_every, amp=args.amp,
                     workers=args.workers, cache_data=args.cache_data, scale_schedule=args.scale_schedule)
    if args.lr_mult:
        overrides["lr_multipliers"] = dict(args.lr_mult)
    if args.model_arg:
        overrides["model"] = dict(args.model_arg)
    preset = get_preset(args.preset, **overrides)
    if clip is not None:
        preset.clip_grad = clip if clip > 0 else None
    return preset


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    preset = preset_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return train(preset, args.data, args.out, resume=args.resume, resume_from=args.resume_from,
                     device=args.device, seed=args.seed, keep_checkpoints=args.keep_checkpoints)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
