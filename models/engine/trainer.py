"""The training loop: ``Trainer(preset, ...).train()``, or ``train(...)`` for one call.

The loop is ``before_step`` hooks, ``run_step`` (one optimisation step of any model that
returns a loss dict in training mode), ``after_step`` hooks; everything else (time budget,
progressive resizing, logging, evaluation, checkpoints) is a hook (``hooks.py``).

Guarantees: a checkpoint holds the model, optimiser, scheduler, grad scaler, iteration, the
RNG states of every rank and the data order, so ``resume`` continues with exactly the losses
an uninterrupted run would have had; checkpoints are written atomically; under torchrun
(DDP: gloo on CPU, nccl on CUDA) every rank trains its shard of each global batch, only
rank 0 writes, and evaluation is sharded and merged by the evaluator.
"""
import os
import time
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .checkpoint import (
    atomic_save,
    atomic_write_text,
    find_resume_checkpoint,
    load_checkpoint,
    param_checksum,
    prune_checkpoints,
)
from .distributed import all_gather_objects, setup_distributed, unwrap
from .evaluation import evaluate
from .hooks import HookBase, default_hooks, summarize_eval
from .loader import SeededDataset, ShardedBatches, build_datasets, collate_lists, to_model_inputs
from .metrics import MetricsLog, format_eta
from .presets import Preset, build_model
from .rng import get_rng_state, seed_everything, set_rng_state
from .solver import build_optimizer


class Trainer:
    """Trains ``build_model(preset)`` on ``datasets`` (``(train, val or None, {label: name})``,
    default: the COCO-layout ``data_dir``), writing metrics.jsonl and checkpoints to
    ``out_dir``. ``hooks``: default ``default_hooks(preset, keep_checkpoints)``."""

    def __init__(self, preset: Preset, data_dir: Optional[str], out_dir: str, *, resume: bool = False,
                 resume_from: Optional[str] = None, device: Optional[str] = None, seed: int = 0, datasets=None,
                 keep_checkpoints: int = 3, hooks: Optional[List[HookBase]] = None, log=print):
        self.t_begin = time.perf_counter()  # the time budget counts from here (data loading included)
        self.preset, self.out_dir, self.seed, self._log = preset, out_dir, seed, log
        self.info = info = setup_distributed(device)
        self.device = dev = info.device
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = False
        if info.is_main:
            os.makedirs(out_dir, exist_ok=True)
        self.hooks = default_hooks(preset, keep_checkpoints) if hooks is None else list(hooks)

        train_set, self.val_set, self.categories = datasets if datasets is not None else \
            build_datasets(data_dir, preset)
        num_classes = getattr(train_set, "num_classes", None)
        if num_classes is not None and num_classes != preset.model.get("num_classes", num_classes):
            self.log(f"the data has {num_classes - 1} categories: num_classes {preset.model['num_classes']} -> "
                     f"{num_classes}")
        if num_classes is not None:
            preset.model["num_classes"] = num_classes

        # Identical initial weights on every rank, then per-rank training randomness.
        seed_everything(seed)
        self.model = build_model(preset).to(dev)
        seed_everything(seed + 7919 * info.rank)
        self.optimizer, self.scheduler = build_optimizer(self.model, preset)
        self.amp = bool(preset.amp)
        self.scaler = torch.amp.GradScaler(dev.type, enabled=self.amp and dev.type == "cuda")
        self.start_iter, self.budget_used_before = 0, 0.0
        ckpt_path = resume_from or (find_resume_checkpoint(out_dir) if resume else None)
        if resume and ckpt_path is None:
            self.log(f"--resume: no checkpoint in {out_dir}, starting from scratch")
        self.resumed = ckpt_path is not None
        if ckpt_path is not None:
            self._restore(ckpt_path)
        if info.distributed:
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None)
        self.model.train()
        self.batches = ShardedBatches(len(train_set), preset.batch_size, seed, info.rank, info.world_size,
                                      start=self.start_iter)
        self.loader = DataLoader(SeededDataset(train_set), batch_sampler=self.batches, num_workers=preset.workers,
                                 collate_fn=collate_lists, pin_memory=dev.type == "cuda", generator=torch.Generator(),
                                 persistent_workers=False, prefetch_factor=2 if preset.workers > 0 else None)
        self.metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl") if info.is_main else None,
                                  truncate_after=self.start_iter if self.resumed else None)
        header = {"iter": self.start_iter, "config": preset.to_dict(), "world_size": info.world_size, "seed": seed,
                  "device": str(dev)}
        if self.resumed:
            header["resumed_from"] = os.path.abspath(ckpt_path)
        self.metrics.write(header)
        self.iteration = self.start_iter
        self.progress = 0.0
        self.stop_reason: Optional[str] = None
        self.last_eval = None
        self.last_step: Dict[str, Any] = {}
        self.losses: List[Dict[str, float]] = []

    @property
    def net(self) -> torch.nn.Module:
        """The model without its DDP wrapper."""
        return unwrap(self.model)

    def log(self, msg: str) -> None:
        if self.info.is_main:
            bar = next((h.bar for h in self.hooks if getattr(h, "bar", None) is not None), None)
            if bar is not None and self._log is print:
                bar.write(msg)  # above the progress bar
            else:
                self._log(msg, flush=True)

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    def budget_used_here(self) -> float:
        """Seconds of wall time this rank has used (earlier runs of a resumed one included)."""
        return self.budget_used_before + time.perf_counter() - self.t_begin

    # -- checkpoints
    def _restore(self, path: str) -> None:
        info, ckpt = self.info, load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_iter = int(ckpt["iteration"])
        self.budget_used_before = float(ckpt.get("budget_elapsed", 0.0))
        data = ckpt.get("data", {})
        global_batch = self.preset.batch_size * info.world_size
        if data.get("seed", self.seed) != self.seed or data.get("global_batch", global_batch) != global_batch:
            self.log("warning: resuming with a different seed or global batch size; the data order changes")
        rng = ckpt.get("rng_per_rank") or []
        if len(rng) == info.world_size:
            set_rng_state(rng[info.rank], self.device)
        elif rng:
            self.log(f"warning: checkpoint has RNG states of {len(rng)} ranks, running {info.world_size}")
            set_rng_state(rng[info.rank % len(rng)], self.device)
        self.log(f"resumed from {path} at iteration {self.start_iter}")

    def save_checkpoint(self, name: str, keep: int = 0) -> None:
        """Writes ``out_dir/name`` (atomically, rank 0) and points ``last_checkpoint`` at it;
        keeps the newest ``keep`` periodic checkpoints (0: all)."""
        rng_all = all_gather_objects(get_rng_state(self.device), self.info)
        if not self.info.is_main:
            return
        state = {
            "model": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "iteration": self.iteration, "rng_per_rank": rng_all, "data": self.batches.state_dict(self.iteration),
            "preset": self.preset.to_dict(),
            "categories": {int(k): str(v) for k, v in (self.categories or {}).items()},
            "seed": self.seed, "world_size": self.info.world_size, "budget_elapsed": self.budget_used_here(),
        }
        atomic_save(state, os.path.join(self.out_dir, name))
        atomic_write_text(name + "\n", os.path.join(self.out_dir, "last_checkpoint"))
        prune_checkpoints(self.out_dir, keep)

    def sync_check(self) -> List[float]:
        """Parameter checksums of every rank (equal when the replicas are in sync)."""
        sums = all_gather_objects(param_checksum(self.net), self.info)
        if self.info.is_main:
            self.metrics.write({"iter": self.iteration, "replica_checksums": sums})
            if len(set(sums)) > 1:
                self.log(f"warning: replicas differ at iteration {self.iteration}: {sums}")
        return sums

    def run_eval(self, max_images: int = 0):
        """COCO evaluation on the first ``max_images`` val images (0: all); None without val data."""
        if self.val_set is None or len(self.val_set) == 0:
            return None
        t0 = time.perf_counter()
        result = evaluate(self.model, self.val_set, self.info, max_images=max_images, progress=False)
        if self.info.is_main and result is not None:
            n = min(len(self.val_set), max_images) if max_images > 0 else len(self.val_set)
            self.metrics.write({"iter": self.iteration, "eval": result, "eval_images": n,
                                "eval_time": time.perf_counter() - t0})
            headline = ", ".join(f"{k} {v:.4f}" for k, v in summarize_eval(result).items())
            self.log(f"eval @ {self.iteration}: {headline}")
        return result

    # -- the loop
    def run_step(self, data_iter) -> None:
        """One optimisation step: the batch, the model's loss dict (summed), backward with
        optional gradient clipping, optimizer and scheduler steps; ``last_step`` records it."""
        t0 = time.perf_counter()
        images, targets = next(data_iter)
        images, targets = to_model_inputs(images, targets, self.device)
        t_data = time.perf_counter() - t0
        dev_type = self.device.type
        with torch.autocast(dev_type, dtype=torch.float16 if dev_type == "cuda" else torch.bfloat16,
                            enabled=self.amp):
            loss_dict = self.model(images, targets)
        loss = sum(v.float() for v in loss_dict.values())
        if not torch.isfinite(loss).item() and not self.scaler.is_enabled():
            raise FloatingPointError(f"non-finite loss at iteration {self.iteration + 1}: "
                                     f"{ {k: float(v) for k, v in loss_dict.items()} }")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        step: Dict[str, Any] = {}
        if self.preset.clip_grad:
            self.scaler.unscale_(self.optimizer)
            params = [p for p in self.model.parameters() if p.grad is not None]
            step["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, self.preset.clip_grad))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.iteration += 1

        # Losses averaged over ranks for logging.
        names = sorted(loss_dict)
        vec = torch.stack([loss_dict[k].detach().float() for k in names])
        if self.info.distributed:
            dist.all_reduce(vec)
            vec /= self.info.world_size
            step["rank0_losses"] = {k: float(loss_dict[k].detach()) for k in names}
        vals = {k: float(v) for k, v in zip(names, vec.cpu())}
        total = float(sum(vals.values()))
        if self.scaler.is_enabled():
            step["loss_scale"] = float(self.scaler.get_scale())
        step.update(loss=total, losses=vals, lr=lr, time=time.perf_counter() - t0, data_time=t_data)
        self.last_step = step
        self.losses.append({"iter": self.iteration, "loss": total, **vals, "local_loss": float(loss.detach())})

    def train(self) -> Dict[str, Any]:
        """Runs until ``preset.iters`` or a hook stops it, then writes model_final.pth and runs
        the final evaluation on all val images. Returns ``{"iteration", "losses" (per
        iteration, this run), "eval" (last evaluation or None), "checksums" (per rank)}``."""
        self.t_start = time.perf_counter()
        data_iter = iter(self.loader)
        try:
            for h in self.hooks:
                h.before_train(self)
            while self.iteration < self.preset.iters:
                self.progress = self.iteration / self.preset.iters
                for h in self.hooks:
                    h.before_step(self)
                if self.stop_reason is not None:
                    break
                self.run_step(data_iter)
                for h in self.hooks:
                    h.after_step(self)
            self.save_checkpoint("model_final.pth")
            sums = self.sync_check()
            if self.iteration > self.start_iter or self.last_eval is None:
                self.last_eval = self.run_eval()
            for h in self.hooks:
                h.after_train(self)
            if self.info.is_main:
                elapsed = time.perf_counter() - self.t_start
                self.metrics.write({"iter": self.iteration, "done": True, "elapsed": elapsed,
                                    "stopped_by_time_budget": self.stop_reason == "time budget",
                                    "budget_elapsed": self.budget_used_here()})
                self.log(f"done: {self.iteration} iterations, {format_eta(elapsed)} this run; "
                         f"{self.out_dir}/model_final.pth")
        finally:
            self.metrics.close()
            del data_iter
        return {"iteration": self.iteration, "losses": self.losses, "eval": self.last_eval, "checksums": sums}


def train(preset: Preset, data_dir: Optional[str], out_dir: str, **kwargs) -> Dict[str, Any]:
    """``Trainer(preset, data_dir, out_dir, **kwargs).train()``."""
    return Trainer(preset, data_dir, out_dir, **kwargs).train()
