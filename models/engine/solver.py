"""Optimizers and learning-rate schedules."""
import math
from typing import Dict, List, Tuple

import torch


class WarmupLR(torch.optim.lr_scheduler.LRScheduler):
    """The learning-rate schedule of the presets: linear warmup from ``warmup_factor * base_lr``
    to ``base_lr`` over ``warmup_iters`` iterations, then multiplied by ``gamma`` at each
    milestone (``mode="step"``), or, with ``mode="cosine"``, a half-cosine from ``base_lr``
    after warmup down to ``min_factor * base_lr`` at ``total_iters`` (milestones ignored).
    Stepped once per iteration."""

    def __init__(self, optimizer, milestones, gamma: float = 0.1, warmup_iters: int = 0,
                 warmup_factor: float = 1e-3, last_epoch: int = -1, mode: str = "step", total_iters: int = 0,
                 min_factor: float = 0.0):
        if mode not in ("step", "cosine"):
            raise ValueError(f"unknown learning rate schedule {mode!r}; use 'step' or 'cosine'")
        if mode == "cosine" and total_iters <= warmup_iters:
            raise ValueError(f"cosine schedule needs total_iters ({total_iters}) > warmup_iters ({warmup_iters})")
        self.milestones = sorted(int(m) for m in milestones)
        self.gamma, self.warmup_iters, self.warmup_factor = gamma, int(warmup_iters), warmup_factor
        self.mode, self.total_iters, self.min_factor = mode, int(total_iters), float(min_factor)
        super().__init__(optimizer, last_epoch)

    def clear_milestones(self) -> None:
        """Removes the step decays (a time-budgeted run adds them as the budget passes)."""
        self.milestones = []

    def add_milestone(self, iteration: int) -> None:
        """Decays the rate by ``gamma`` from ``iteration`` on (from the next step)."""
        self.milestones = sorted(self.milestones + [int(iteration)])

    def factor(self, it: int) -> float:
        f = 1.0
        if it < self.warmup_iters:
            alpha = it / self.warmup_iters
            f = self.warmup_factor * (1 - alpha) + alpha
        if self.mode == "cosine":
            if it < self.warmup_iters:
                return f
            t = min(1.0, (it - self.warmup_iters) / (self.total_iters - self.warmup_iters))
            return self.min_factor + (1 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * t))
        return f * self.gamma ** sum(1 for m in self.milestones if it >= m)

    def get_lr(self):
        f = self.factor(self.last_epoch)
        return [base * f for base in self.base_lrs]


# ``preset.optimizer`` -> a builder of the optimizer from the parameter groups and the preset.
OPTIMIZERS = {
    "sgd": lambda groups, preset: torch.optim.SGD(groups, lr=preset.lr, momentum=preset.momentum),
    "adamw": lambda groups, preset: torch.optim.AdamW(groups, lr=preset.lr),  # decoupled weight decay
}


def parameter_groups(model: torch.nn.Module, lr: float, weight_decay: float,
                     lr_multipliers: Dict[str, float] = None) -> List[Dict]:
    """Parameter groups: no weight decay on normalisation parameters and biases (tensors of
    one dimension), and the learning rate of parameters whose name starts with a key of
    ``lr_multipliers`` (the longest match) multiplied by its value (Mask2Former trains its
    backbone at ``{"backbone": 0.1}``). Without multipliers: [decayed, not decayed]."""
    lr_multipliers = dict(lr_multipliers or {})
    groups: Dict[Tuple[float, bool], List[torch.nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefixes = [k for k in lr_multipliers if name == k or name.startswith(k.rstrip(".") + ".")]
        mult = float(lr_multipliers[max(prefixes, key=len)]) if prefixes else 1.0
        groups.setdefault((mult, p.ndim > 1), []).append(p)
    order = sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))
    return [{"params": groups[k], "lr": lr * k[0], "weight_decay": weight_decay if k[1] else 0.0} for k in order]


def build_optimizer(model: torch.nn.Module, preset):
    """The preset's optimizer (``OPTIMIZERS``: SGD with momentum or AdamW) over
    ``parameter_groups`` (``preset.lr_multipliers``), and its ``WarmupLR`` schedule."""
    if preset.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {preset.optimizer!r}; use one of {sorted(OPTIMIZERS)}")
    groups = parameter_groups(model, preset.lr, preset.weight_decay, preset.lr_multipliers)
    optimizer = OPTIMIZERS[preset.optimizer](groups, preset)
    scheduler = WarmupLR(optimizer, preset.milestones, preset.gamma, preset.warmup_iters,
                         preset.warmup_factor, mode=preset.schedule, total_iters=preset.iters)
    return optimizer, scheduler
