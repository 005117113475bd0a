"""Training presets for ``python -m instseg_ops.models.train --preset NAME``.

A preset holds the model's keyword arguments (passed to ``maskrcnn_resnet_fpn``), the optimiser
settings (SGD with momentum, linear warmup, step decay or cosine), the schedule length, batch size,
evaluation / checkpoint / log periods and the image size. ``get_preset(name, **overrides)``
returns a copy with fields replaced; when ``iters`` is overridden without ``milestones``,
the milestones (and warmup, if it no longer fits) are scaled to the new length.
"""
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

# The synthetic shapes data set: 6 categories + background.
SHAPES_NUM_CLASSES = 7


@dataclass
class Preset:
    name: str
    model: Dict[str, Any]  # maskrcnn_resnet_fpn keyword arguments (depth, norm, num_classes, sizes, ...)
    iters: int
    batch_size: int  # images per process
    lr: float  # base learning rate (not scaled with the number of processes)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adamw" (decoupled weight decay)
    warmup_iters: int = 100
    warmup_factor: float = 1e-3  # lr multiplier at iteration 0, linearly up to 1 at warmup_iters
    milestones: Tuple[int, ...] = ()
    gamma: float = 0.1
    schedule: str = "step"  # "step": x gamma at each milestone; "cosine": half-cosine to 0 at iters (no milestones)
    # Wall-time budget in minutes (0: off). When set, training stops once the budget minus
    # budget_reserve_s (kept for the final checkpoint and evaluation) is used, ``iters`` is only
    # an upper bound, and the step decays come when these fractions of it have passed.
    time_budget: float = 0.0
    budget_milestones: Tuple[float, ...] = (0.8, 0.93)
    budget_reserve_s: float = 45.0
    # Progressive resizing: ((fraction, scale), ...) trains with images resized by ``scale`` times
    # the model's size until that fraction of the run has passed (of the time budget when one is
    # set, else of ``iters``), then at full size. Evaluation always uses the full size.
    scale_schedule: Tuple[Tuple[float, float], ...] = ()
    eval_period: int = 0  # 0: evaluate only at the end
    eval_images: int = 0  # periodic evaluations use the first N val images (0: all); the final one uses all
    checkpoint_period: int = 0  # 0: only the final checkpoint
    log_period: int = 20
    image_size: int = 256  # the generated / expected image size (the model's min_size/max_size follow it)
    hflip_prob: float = 0.5  # training augmentation
    amp: bool = False  # mixed precision (CUDA: float16 autocast + GradScaler)
    clip_grad: Optional[float] = None  # max gradient norm, None: no clipping
    workers: int = 2
    cache_data: bool = False  # keep decoded images and masks in memory (per process; see CocoInstanceDataset)
    extra: Dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["budget_milestones"] = list(self.budget_milestones)
        d["scale_schedule"] = [list(x) for x in self.scale_schedule]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Preset":
        d = dict(d)
        d["milestones"] = tuple(d.get("milestones", ()))
        if "budget_milestones" in d:
            d["budget_milestones"] = tuple(d["budget_milestones"])
        if "scale_schedule" in d:
            d["scale_schedule"] = _float_pairs(d["scale_schedule"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _float_pairs(pairs) -> Tuple[Tuple[float, float], ...]:
    """``scale_schedule`` as a tuple of (fraction, scale) float pairs (from lists, e.g. JSON)."""
    return tuple((float(f), float(s)) for f, s in pairs)


def _small_image_model(depth: int, size: int, fpn_channels: int, representation_size: int, mask_channels: int,
                       num_mask_layers: int, anchor_base: int, **extra) -> Dict[str, Any]:
    """Model kwargs for training from scratch on small images: trainable GroupNorm everywhere
    (backbone, FPN, mask head), all backbone stages trainable, half-pixel-correct RoI geometry
    (``aligned``), anchors and RPN/RoI sample counts scaled down to a few small objects per image."""
    kw = dict(
        depth=depth, num_classes=SHAPES_NUM_CLASSES, norm="gn", fpn_norm="gn", head_norm="gn", trainable_layers=5,
        aligned=True,
        fpn_channels=fpn_channels, representation_size=representation_size,
        mask_layers=(mask_channels,) * num_mask_layers, mask_hidden=mask_channels,
        min_size=size, max_size=size,
        anchor_sizes=tuple((anchor_base * 2 ** i,) for i in range(5)),
        rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
        rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
        rpn_batch_size_per_image=128, box_batch_size_per_image=128, box_detections_per_img=50,
    )
    kw.update(extra)
    return kw


PRESETS: Dict[str, Preset] = {
    # ResNet-18-FPN (full width) from scratch on 256 px synthetic shapes, CPU sized: about 1.5-3 s per
    # iteration of 4 images on one or two busy cores, so the default 2000 iterations take hours; pass
    # --iters for a shorter run (the milestones scale with it).
    "shapes_r18_cpu": Preset(
        name="shapes_r18_cpu",
        model=_small_image_model(18, 256, fpn_channels=128, representation_size=512, mask_channels=128,
                                 num_mask_layers=2, anchor_base=16),
        iters=2000, batch_size=4, lr=0.02, weight_decay=1e-4, warmup_iters=100, milestones=(1400, 1800),
        gamma=0.1, eval_period=250, eval_images=50, checkpoint_period=250, log_period=10, image_size=256,
        workers=1, clip_grad=10.0,
    ),
    # Half-width ResNet-18-FPN (stages of 32-256 channels instead of 64-512) on 256 px shapes:
    # about 4x fewer backbone FLOPs than shapes_r18_cpu, for the 30-minute CPU run. It trains for
    # a wall-time budget of 29 minutes (final evaluation included), decaying the learning rate at
    # 80% and 93% of it; ``iters`` only bounds the run. Data loading in the training process
    # (a loader process slowed 2-thread training ~10%). The mask loss uses at most 8 positive RoIs
    # per image (iterations ~20% faster; more iterations in the budget outweighed the slightly
    # slower learning per iteration in the measured runs, see benchmarks/RESULTS.md). Decoded
    # images and masks stay in memory (about 0.5 GB for 1000 images of 256 px). Progressive
    # resizing: the first 30% of the budget trains on 160 px images, the next 30% on 192 px
    # (~0.6x and ~0.7x the time per iteration, and no slower learning per iteration in the
    # measured runs).
    "shapes_r18_fast_cpu": Preset(
        name="shapes_r18_fast_cpu",
        model=_small_image_model(18, 256, fpn_channels=64, representation_size=256, mask_channels=64,
                                 num_mask_layers=2, anchor_base=16, width=32, mask_positives_per_image=8),
        iters=20000, batch_size=4, lr=0.04, weight_decay=1e-4, warmup_iters=200, milestones=(15000, 18000),
        gamma=0.1, time_budget=29.0, eval_period=1000, eval_images=50, checkpoint_period=1000, log_period=50,
        image_size=256, workers=0, clip_grad=10.0, cache_data=True,
        scale_schedule=((0.3, 0.625), (0.6, 0.75)),
    ),
    # ResNet-50-FPN from scratch on 512 px synthetic shapes, one GPU, mixed precision.
    "shapes_r50_gpu": Preset(
        name="shapes_r50_gpu",
        model=_small_image_model(50, 512, fpn_channels=256, representation_size=1024, mask_channels=256,
                                 num_mask_layers=4, anchor_base=32, rpn_batch_size_per_image=256,
                                 box_batch_size_per_image=256, rpn_pre_nms_top_n_train=2000,
                                 rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
                                 rpn_post_nms_top_n_test=500, box_detections_per_img=100),
        iters=12000, batch_size=8, lr=0.02, weight_decay=1e-4, warmup_iters=500, milestones=(8000, 10500),
        gamma=0.1, eval_period=2000, eval_images=0, checkpoint_period=2000, log_period=50, image_size=512, amp=True,
        workers=6, clip_grad=10.0,
    ),
    # Very small network on 64 px images: for tests and smoke runs (seconds on a CPU).
    "tiny_cpu": Preset(
        name="tiny_cpu",
        model=_small_image_model(18, 64, fpn_channels=16, representation_size=32, mask_channels=16,
                                 num_mask_layers=1, anchor_base=8, width=8, rpn_batch_size_per_image=64,
                                 box_batch_size_per_image=32, rpn_pre_nms_top_n_train=200,
                                 rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=100,
                                 rpn_post_nms_top_n_test=50, box_detections_per_img=20),
        iters=20, batch_size=2, lr=0.01, weight_decay=1e-4, warmup_iters=5, milestones=(15,), gamma=0.1,
        eval_period=0, checkpoint_period=0, log_period=5, image_size=64, workers=0,
    ),
}


def preset_names():
    return sorted(PRESETS)


def get_preset(name: str, **overrides) -> Preset:
    """A copy of preset ``name`` with fields replaced by ``overrides`` (None values are ignored;
    ``model`` overrides are merged into the model kwargs)."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    p = copy.deepcopy(PRESETS[name])
    overrides = {k: v for k, v in overrides.items() if v is not None}
    model_over = overrides.pop("model", None)
    if model_over:
        p.model.update(model_over)
    new_iters = overrides.get("iters")
    if new_iters is not None and "milestones" not in overrides and new_iters != p.iters:
        scale = new_iters / p.iters
        overrides["milestones"] = tuple(sorted({max(1, round(m * scale)) for m in p.milestones}))
        if "warmup_iters" not in overrides:
            overrides["warmup_iters"] = min(p.warmup_iters, max(0, new_iters // 4))
    names = {f.name for f in dataclasses.fields(Preset)}
    unknown = set(overrides) - names
    if unknown:
        raise KeyError(f"unknown preset fields: {sorted(unknown)}")
    for k, v in overrides.items():
        if k == "scale_schedule":
            v = _float_pairs(v)
        setattr(p, k, tuple(v) if k in ("milestones", "budget_milestones") else v)
    return p
