"""Hooks of the training loop (as detectron2's ``HookBase``): each concern of a run that is not
the optimisation step itself (the wall-time budget, progressive resizing, logging, periodic
and timed evaluation, checkpoints) is a hook with ``before_train``, ``before_step``, ``after_step``
and ``after_train``, called in list order. ``Trainer.progress`` is the fraction of the run
that has passed (of ``iters``, or of the time budget when ``TimeBudget`` is used)."""
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .metrics import format_eta


class HookBase:
    def before_train(self, trainer) -> None:
        pass

    def before_step(self, trainer) -> None:
        pass

    def after_step(self, trainer) -> None:
        pass

    def after_train(self, trainer) -> None:
        pass


class TimeBudget(HookBase):
    """Trains until ``minutes`` of wall time minus ``reserve_s`` (kept for the final checkpoint
    and evaluation) are used, counted from the trainer's start plus what earlier runs of a
    resumed one used; decays the learning rate as the ``milestones`` fractions of it pass. The
    budget used is the largest over ranks, so that every rank stops at the same iteration."""

    def __init__(self, minutes: float, reserve_s: float, milestones: Sequence[float]):
        self.budget = 60.0 * float(minutes)
        self.usable = self.budget - reserve_s
        self.fracs = sorted(milestones)
        self.decays = 0
        if self.usable <= 0:
            raise ValueError(f"time budget {self.budget:.0f} s is not larger than its reserve "
                             f"({reserve_s:.0f} s for the final evaluation)")

    def before_train(self, trainer) -> None:
        if not trainer.resumed:
            trainer.scheduler.clear_milestones()  # added as the budget's fractions pass
        self.decays = len(trainer.scheduler.milestones)

    def used(self, trainer) -> float:
        used = trainer.budget_used_here()
        if trainer.info.distributed:
            t = torch.tensor([used], dtype=torch.float64, device=trainer.device)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            used = float(t.item())
        return used

    def remaining(self, trainer) -> float:
        return self.usable - trainer.budget_used_here()

    def before_step(self, trainer) -> None:
        trainer.progress = frac = self.used(trainer) / self.usable
        if frac >= 1.0:
            trainer.stop("time budget")
            return
        while self.decays < len(self.fracs) and frac >= self.fracs[self.decays]:
            # The scheduler applies it from the next step.
            trainer.scheduler.add_milestone(max(trainer.iteration, 1))
            self.decays += 1
            trainer.log(f"time budget {100 * frac:.0f}% used: learning rate x{trainer.preset.gamma} from iteration "
                        f"{trainer.iteration + 1}")


def scale_at(schedule: Sequence[Tuple[float, float]], frac: float) -> float:
    """The training image scale of a progressive-resizing ``schedule`` (``Preset.scale_schedule``)
    once ``frac`` of the run has passed: the scale of the first entry whose fraction is not yet
    reached, else 1."""
    for until, scale in sorted(schedule):
        if frac < until:
            return float(scale)
    return 1.0


def check_scale_schedule(schedule: Sequence[Tuple[float, float]]) -> None:
    for entry in schedule:
        if len(entry) != 2:
            raise ValueError(f"scale_schedule entries are (fraction, scale) pairs, got {entry!r}")
        until, scale = entry
        if not (0.0 < float(until) <= 1.0) or not (0.0 < float(scale) <= 4.0):
            raise ValueError(f"scale_schedule entry {entry!r}: the fraction must be in (0, 1] and the scale in "
                             "(0, 4]")


class ProgressiveResize(HookBase):
    """Progressive resizing: sets the model's training image scale (``model.set_train_scale``)
    from ``schedule`` at the run's progress (evaluation always uses the full size)."""

    def __init__(self, schedule: Sequence[Tuple[float, float]]):
        check_scale_schedule(schedule)
        self.schedule = tuple(schedule)
        self.scale: Optional[float] = None

    def before_train(self, trainer) -> None:
        if not hasattr(trainer.net, "set_train_scale"):
            raise ValueError(f"scale_schedule needs a model with set_train_scale(), got {type(trainer.net).__name__}")

    def before_step(self, trainer) -> None:
        scale = scale_at(self.schedule, trainer.progress)
        if scale != self.scale:
            self.scale = scale
            trainer.net.set_train_scale(scale)
            trainer.log(f"training images at {scale:g}x the model's size from iteration {trainer.iteration + 1}")


class MetricsWriter(HookBase):
    """One metrics.jsonl record per iteration; a progress line (losses by the model's names,
    learning rate, median seconds per iteration, ETA) every ``period`` iterations, and on a
    terminal a tqdm progress bar (``progress_bar``: None chooses by whether stderr is one)."""

    def __init__(self, period: int, budget: Optional[TimeBudget] = None, progress_bar: Optional[bool] = None):
        self.period = max(1, period)
        self.budget = budget
        self.window: List[float] = []
        self.progress_bar = sys.stderr.isatty() if progress_bar is None else progress_bar
        self.bar = None

    def before_train(self, trainer) -> None:
        if self.progress_bar and trainer.info.is_main:
            from tqdm import tqdm
            self.bar = tqdm(total=trainer.preset.iters, initial=trainer.start_iter, unit="it", dynamic_ncols=True,
                            desc=trainer.preset.name)

    def after_train(self, trainer) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def after_step(self, trainer) -> None:
        step = trainer.last_step
        self.window = (self.window + [step["time"]])[-20:]
        if not trainer.info.is_main:
            return
        rec = {"iter": trainer.iteration, "loss": step["loss"], "losses": step["losses"], "lr": step["lr"],
               "time": step["time"], "data_time": step["data_time"], "elapsed": time.perf_counter() - trainer.t_start}
        for k in ("rank0_losses", "grad_norm", "loss_scale"):
            if k in step:
                rec[k] = step[k]
        trainer.metrics.write(rec)
        it, iters = trainer.iteration, trainer.preset.iters
        if self.bar is not None:
            self.bar.update(1)
            eta = self.budget.remaining(trainer) if self.budget else None
            self.bar.set_postfix_str(f"loss {step['loss']:.3f}" + (f" budget left {format_eta(eta)}" if eta else ""),
                                     refresh=False)
        if it == trainer.start_iter + 1 or it % self.period == 0 or it == iters:
            per_it = sorted(self.window)[len(self.window) // 2]
            eta = format_eta(self.budget.remaining(trainer) if self.budget else per_it * (iters - it))
            parts = " ".join(f"{short_loss_name(k)} {v:.4f}" for k, v in step["losses"].items())
            mem = ""
            if trainer.device.type == "cuda":
                mem = f"  mem {torch.cuda.max_memory_allocated(trainer.device) / 2 ** 20:.0f}M"
            trainer.log(f"[{trainer.preset.name}] iter {it}/{iters}  loss {step['loss']:.4f} ({parts})  "
                        f"lr {step['lr']:.2e}  {per_it:.3f} s/it (data {step['data_time']:.3f})  eta {eta}{mem}")


def short_loss_name(key: str) -> str:
    """``loss_box_reg`` -> ``box_reg``: the model's loss names without the common prefix."""
    return key[5:] if key.startswith("loss_") else key


class PeriodicEval(HookBase):
    """Evaluates every ``period`` iterations (before the last) on the first ``max_images``."""

    def __init__(self, period: int, max_images: int):
        self.period, self.max_images = period, max_images

    def after_step(self, trainer) -> None:
        if self.period and trainer.iteration % self.period == 0 and trainer.iteration < trainer.preset.iters:
            trainer.last_eval = trainer.run_eval(self.max_images)


class EvalAtMinutes(HookBase):
    """Evaluates on all val images after the first step that ends past each of ``minutes`` of
    the run's wall time (earlier runs of a resumed one included): the AP "after 30 minutes" of
    a longer run. The evaluation's own time counts against a time budget."""

    def __init__(self, minutes: Sequence[float]):
        self.marks = sorted(float(m) for m in minutes)
        if any(m <= 0 for m in self.marks):
            raise ValueError(f"eval_at_minutes must be positive, got {tuple(minutes)!r}")
        self.done = 0

    def before_train(self, trainer) -> None:
        before = trainer.budget_used_before  # of earlier runs of a resumed one
        self.done = sum(1 for m in self.marks if 60.0 * m <= before)

    def after_step(self, trainer) -> None:
        used = trainer.budget_used_here()
        if self.done < len(self.marks) and used >= 60.0 * self.marks[self.done]:
            while self.done < len(self.marks) and used >= 60.0 * self.marks[self.done]:
                self.done += 1
            mark = self.marks[self.done - 1]  # marks passed within one step: one evaluation, the latest mark
            if trainer.info.is_main:
                trainer.metrics.write({"iter": trainer.iteration, "eval_at_minutes": mark, "budget_elapsed": used})
                trainer.log(f"{mark:g} minutes passed at iteration {trainer.iteration} ({used / 60:.2f} min used)")
            trainer.last_eval = trainer.run_eval(0)


class PeriodicCheckpoint(HookBase):
    """Checkpoints every ``period`` iterations (before the last), keeping the newest ``keep``."""

    def __init__(self, period: int, keep: int):
        self.period, self.keep = period, keep

    def after_step(self, trainer) -> None:
        if self.period and trainer.iteration % self.period == 0 and trainer.iteration < trainer.preset.iters:
            trainer.save_checkpoint(f"checkpoint_{trainer.iteration:07d}.pth", keep=self.keep)
            trainer.sync_check()


def default_hooks(preset, keep_checkpoints: int) -> List[HookBase]:
    """The preset's hooks, in order: time budget, progressive resizing, metrics, periodic
    evaluation, evaluation at given minutes, periodic checkpoints."""
    hooks: List[HookBase] = []
    budget = None
    if preset.time_budget and preset.time_budget > 0:
        if preset.schedule != "step":
            raise ValueError("a time budget needs the step schedule (its decays come at fractions of the budget)")
        budget = TimeBudget(preset.time_budget, preset.budget_reserve_s, preset.budget_milestones)
        hooks.append(budget)
    if preset.scale_schedule:
        hooks.append(ProgressiveResize(preset.scale_schedule))
    hooks += [MetricsWriter(preset.log_period, budget), PeriodicEval(preset.eval_period, preset.eval_images)]
    if preset.eval_at_minutes:
        hooks.append(EvalAtMinutes(preset.eval_at_minutes))
    hooks.append(PeriodicCheckpoint(preset.checkpoint_period, keep_checkpoints))
    return hooks


def summarize_eval(result: Dict) -> Dict[str, float]:
    """A few scalar entries of an evaluation result for the progress line."""
    out = {}
    for k, v in result.items():
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if isinstance(v2, (int, float)) and k2 in ("AP", "AP50", "AP75"):
                    out[f"{k}/{k2}"] = float(v2)
        elif isinstance(v, (int, float)):
            out[k] = float(v)
    return out
