"""Training presets for ``python -m instseg_ops.models.train --preset NAME``.

A preset names its architecture (``arch``: a registered model, ``instseg_ops.models.list_models()``)
with keyword overrides for it (``model``), the optimiser settings (SGD with momentum or AdamW,
linear warmup, step decay or cosine, per-parameter-group learning-rate multipliers), the
schedule length or wall-time budget, batch size and the evaluation / checkpoint / log periods.
``get_preset(name, **overrides)`` returns a copy with fields replaced; when ``iters`` is
overridden without ``milestones``, the milestones (and warmup, if it no longer fits) are
scaled to the new length. ``build_model(preset)`` builds its model.
"""
import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple


@dataclass
class Preset:
    name: str
    arch: str = "maskrcnn_resnet_fpn"  # a registered model (instseg_ops.models.get_model)
    model: Dict[str, Any] = field(default_factory=dict)  # keyword overrides for the architecture's builder
    iters: int = 1000
    batch_size: int = 2  # images per process
    lr: float = 0.02  # base learning rate (not scaled with the number of processes)
    momentum: float = 0.9  # SGD only
    weight_decay: float = 1e-4
    lr_multipliers: Dict[str, float] = field(default_factory=dict)  # parameter-name prefix -> lr factor
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
    # Evaluations on all val images once these many minutes of the run's wall time have passed
    # (e.g. (30.0,) in a 60-minute run: the AP after 30 minutes; the time they take counts).
    eval_at_minutes: Tuple[float, ...] = ()
    checkpoint_period: int = 0  # 0: only the final checkpoint
    log_period: int = 20
    hflip_prob: float = 0.5  # training augmentation
    amp: bool = False  # mixed precision (CUDA: float16 autocast + GradScaler)
    clip_grad: Optional[float] = None  # max gradient norm, None: no clipping
    workers: int = 2
    cache_data: bool = False  # keep decoded images and masks in memory (per process; see CocoInstanceDataset)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["milestones"] = list(self.milestones)
        d["budget_milestones"] = list(self.budget_milestones)
        d["eval_at_minutes"] = list(self.eval_at_minutes)
        d["scale_schedule"] = [list(x) for x in self.scale_schedule]
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "Preset":
        d = dict(d)
        d["milestones"] = tuple(d.get("milestones", ()))
        # Checkpoints written before presets named their architecture hold the full keyword
        # arguments of maskrcnn_resnet_fpn (the default arch).
        if "budget_milestones" in d:
            d["budget_milestones"] = tuple(d["budget_milestones"])
        if "eval_at_minutes" in d:
            d["eval_at_minutes"] = tuple(float(m) for m in d["eval_at_minutes"])
        if "scale_schedule" in d:
            d["scale_schedule"] = _float_pairs(d["scale_schedule"])
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _float_pairs(pairs) -> Tuple[Tuple[float, float], ...]:
    """``scale_schedule`` as a tuple of (fraction, scale) float pairs (from lists, e.g. JSON)."""
    return tuple((float(f), float(s)) for f, s in pairs)


PRESETS: Dict[str, Preset] = {
    # ResNet-18-FPN (full width) from scratch on 256 px synthetic shapes, CPU sized: about 1.5-3 s per
    # iteration of 4 images on one or two busy cores, so the default 2000 iterations take hours; pass
    # --iters for a shorter run (the milestones scale with it).
    "shapes_r18_cpu": Preset(
        name="shapes_r18_cpu",
        arch="maskrcnn_r18_shapes",
        iters=2000, batch_size=4, lr=0.02, weight_decay=1e-4, warmup_iters=100, milestones=(1400, 1800),
        gamma=0.1, eval_period=250, eval_images=50, checkpoint_period=250, log_period=10,
        workers=1, clip_grad=10.0,
    ),
    # Half-width ResNet-18-FPN (stages of 32-256 channels) on 256 px shapes, for a 30-minute CPU
    # run: a wall-time budget of 29 minutes (final evaluation included) with the learning-rate
    # decays at 80% and 93% of it (``iters`` only bounds the run), data loaded in the training
    # process and cached in memory (about 0.5 GB for 1000 images of 256 px), and progressive
    # resizing: 160 px for the first 30% of the budget, 192 px for the next 30%. The runs behind
    # these choices are in benchmarks/RESULTS.md.
    "shapes_r18_fast_cpu": Preset(
        name="shapes_r18_fast_cpu",
        arch="maskrcnn_r18_half_shapes",
        iters=20000, batch_size=4, lr=0.04, weight_decay=1e-4, warmup_iters=200, milestones=(15000, 18000),
        gamma=0.1, time_budget=29.0, eval_period=1000, eval_images=50, checkpoint_period=1000, log_period=50,
        workers=0, clip_grad=10.0, cache_data=True,
        scale_schedule=((0.3, 0.625), (0.6, 0.75)),
    ),
    # ResNet-50-FPN from scratch on 512 px synthetic shapes, one GPU, mixed precision.
    "shapes_r50_gpu": Preset(
        name="shapes_r50_gpu",
        arch="maskrcnn_r50_shapes",
        iters=12000, batch_size=8, lr=0.02, weight_decay=1e-4, warmup_iters=500, milestones=(8000, 10500),
        gamma=0.1, eval_period=2000, eval_images=0, checkpoint_period=2000, log_period=50, amp=True,
        workers=6, clip_grad=10.0,
    ),
    # Very small network on 64 px images: for tests and smoke runs (seconds on a CPU).
    "tiny_cpu": Preset(
        name="tiny_cpu",
        arch="maskrcnn_tiny_shapes",
        iters=20, batch_size=2, lr=0.01, weight_decay=1e-4, warmup_iters=5, milestones=(15,), gamma=0.1,
        eval_period=0, checkpoint_period=0, log_period=5, workers=0,
    ),
}


def register_preset(preset: Preset, *, replace: bool = False) -> Preset:
    """Add ``preset`` to the table ``--preset`` chooses from (model families call this when their
    module is imported); a name already taken is an error unless ``replace``."""
    if not isinstance(preset, Preset):
        raise TypeError(f"register_preset takes a Preset, got {type(preset).__name__}")
    if preset.name in PRESETS and not replace:
        raise KeyError(f"preset {preset.name!r} is already registered")
    PRESETS[preset.name] = preset
    return preset


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


def build_model(preset: Preset):
    """The preset's model: ``get_model(preset.arch, **preset.model)``."""
    from ..registry import get_model
    return get_model(preset.arch, **preset.model)
