"""Train Mask R-CNN (instseg_ops.models) on a COCO-format instance segmentation data set.

    python -m instseg_ops.models.train --preset shapes_r18_cpu --data DIR --out RUN_DIR \\
        [--iters N] [--batch-size B] [--lr LR] [--eval-every K] [--resume] [--amp] \\
        [--clip-grad X] [--workers W] [--device cpu|cuda] [--seed S]

Multi-process (DDP): ``torchrun --nproc_per_node P -m instseg_ops.models.train ...`` (gloo on
CPU, nccl on CUDA); each process takes its own shard of every global batch, only rank 0 logs
and writes checkpoints, evaluation runs sharded and is gathered on rank 0.

RUN_DIR receives ``metrics.jsonl`` (one JSON object per iteration: iter, losses, lr, times;
evaluation records with COCO bbox/segm AP), ``checkpoint_NNNNNNN.pth`` every checkpoint
period (with ``last_checkpoint`` naming the newest), and ``model_final.pth``. A checkpoint
holds the model, optimiser, scheduler, grad scaler, iteration, the RNG states of torch /
numpy / python (of every rank) and the data order state, so that ``--resume`` continues with
exactly the losses an uninterrupted run would have had.

Data order: an endless sequence of epochs, each a permutation drawn from ``seed`` and the
epoch number; global batch ``b`` is split into per-rank shards. Each sample is loaded under
its own RNG seed (derived from the seed and its position), so random augmentation does not
depend on the number of loader workers nor on resuming.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .presets import Preset, get_preset, preset_names

LOSS_KEYS = ("loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg")
LOSS_SHORT = {"loss_classifier": "cls", "loss_box_reg": "box", "loss_mask": "mask", "loss_objectness": "obj",
              "loss_rpn_box_reg": "rpn_box"}


# ----------------------------------------------------------------------------------------------
# distributed


class DistInfo:
    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device: str = "cpu"):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device = torch.device(device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: Optional[str]) -> DistInfo:
    """Reads torchrun's environment; with WORLD_SIZE > 1 initialises the process group
    (nccl for CUDA, gloo for CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if device == "cuda":
            device = "cuda:0" if torch.cuda.is_available() else device
        return DistInfo(0, 1, 0, device)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
        backend = "nccl"
    else:
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return DistInfo(rank, world, local_rank, device)


def all_gather_objects(obj, info: DistInfo) -> List[Any]:
    if not info.distributed:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ----------------------------------------------------------------------------------------------
# learning rate schedule


class WarmupMultiStepLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup from ``warmup_factor * base_lr`` to ``base_lr`` over ``warmup_iters``
    iterations, then multiplied by ``gamma`` at each milestone (``mode="step"``), or, with
    ``mode="cosine"``, a half-cosine from ``base_lr`` after warmup down to ``min_factor * base_lr``
    at ``total_iters`` (milestones ignored). Stepped once per iteration."""

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


def build_optimizer(model: torch.nn.Module, preset: Preset):
    """The preset's optimizer (``OPTIMIZERS``: SGD with momentum or AdamW); no weight decay on
    normalisation parameters and biases."""
    if preset.optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {preset.optimizer!r}; use one of {sorted(OPTIMIZERS)}")
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": preset.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    optimizer = OPTIMIZERS[preset.optimizer](groups, preset)
    scheduler = WarmupMultiStepLR(optimizer, preset.milestones, preset.gamma, preset.warmup_iters,
                                  preset.warmup_factor, mode=preset.schedule, total_iters=preset.iters)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------
# RNG state


def _numpy_state_to_plain(state):
    name, keys, pos, has_gauss, cached = state
    return [name, torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state_from_plain(state):
    name, keys, pos, has_gauss, cached = state
    return (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def get_rng_state(device: torch.device) -> Dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": _numpy_state_to_plain(np.random.get_state()),
             "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(_numpy_state_from_plain(state["numpy"]))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def preserved_rng(device: torch.device):
    """Runs the block without disturbing the RNG streams (used around evaluation)."""
    state = get_rng_state(device)
    try:
        yield
    finally:
        set_rng_state(state, device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# data order


class ShardedBatches:
    """Endless deterministic batches for one rank. Epoch ``e`` is a permutation of the data set
    drawn from ``seed`` and ``e`` (wrapped around to fill the last global batch); global batch
    ``b`` holds ``batch_size * world_size`` samples, rank ``r`` takes its ``r``-th slice. Yields
    lists of ``(index, sample_seed)``. ``start`` is the number of global batches already used
    (the data order state kept in checkpoints)."""

    def __init__(self, size: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 start: int = 0, shuffle: bool = True):
        if size <= 0:
            raise ValueError("the training set is empty")
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.rank, self.world_size, self.start, self.shuffle = rank, world_size, start, shuffle
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = math.ceil(size / self.global_batch)
        self._epoch, self._perm = -1, None

    def state_dict(self, consumed: int) -> Dict[str, int]:
        return {"seed": self.seed, "batches_consumed": consumed, "size": self.size,
                "global_batch": self.global_batch}

    def _permutation(self, epoch: int) -> List[int]:
        if epoch != self._epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                perm = torch.randperm(self.size, generator=g).tolist()
            else:
                perm = list(range(self.size))
            need = self.batches_per_epoch * self.global_batch
            self._perm = (perm * math.ceil(need / self.size))[:need]
            self._epoch = epoch
        return self._perm

    def batch(self, b: int) -> List[tuple]:
        epoch, j = divmod(b, self.batches_per_epoch)
        perm = self._permutation(epoch)
        lo = j * self.global_batch + self.rank * self.batch_size
        base = (self.seed * 1000003 + b * self.global_batch + self.rank * self.batch_size) % (2 ** 31)
        return [(perm[lo + k], (base + k) % (2 ** 31)) for k in range(self.batch_size)]

    def __iter__(self) -> Iterator[List[tuple]]:
        b = self.start
        while True:
            yield self.batch(b)
            b += 1


class SeededDataset(Dataset):
    """``ds[(index, seed)]``: loads ``index`` with python/numpy/torch RNGs seeded by ``seed``,
    leaving the caller's RNG states as they were."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        index, seed = item
        with preserved_rng(torch.device("cpu")):
            seed_everything(seed)
            return self.dataset[index]


def collate_lists(batch):
    return tuple(zip(*batch))


# ----------------------------------------------------------------------------------------------
# data sets (instseg_ops.models.data)


def build_datasets(data_dir: str, preset: Preset):
    """Training and validation sets of a COCO-layout directory as written by
    ``python -m instseg_ops.models.data.shapes``: ``DIR/{train,val}/*.png`` and
    ``DIR/annotations/instances_{train,val}.json`` (val optional). Returns
    ``(train, val or None, {label: name})``; training images without annotations are left out
    and flipped with ``preset.hflip_prob``."""
    from .data import CocoInstanceDataset, Compose, RandomHorizontalFlip
    ann = os.path.join(data_dir, "annotations", "instances_{}.json")
    transforms = Compose([RandomHorizontalFlip(preset.hflip_prob)]) if preset.hflip_prob > 0 else None
    cache = preset.cache_data
    train_set = CocoInstanceDataset(os.path.join(data_dir, "train"), ann.format("train"), transforms=transforms,
                                    remove_empty=True, cache=cache)
    val_set = None
    if os.path.exists(ann.format("val")) and os.path.isdir(os.path.join(data_dir, "val")):
        val_set = CocoInstanceDataset(os.path.join(data_dir, "val"), ann.format("val"), cache=cache)
    names = {i: n for i, n in enumerate(train_set.class_names) if i > 0}
    return train_set, val_set, names


def _to_model_inputs(images, targets, device):
    out_images = []
    for im in images:
        if not im.is_floating_point():
            im = im.float() / 255.0
        out_images.append(im.to(device, non_blocking=True))
    out_targets = None
    if targets is not None:
        out_targets = []
        for t in targets:
            d = {k: t[k].to(device, non_blocking=True) for k in ("boxes", "labels", "masks") if k in t}
            d["boxes"] = d["boxes"].float()
            d["labels"] = d["labels"].long()
            if "masks" in d and d["masks"].dtype != torch.uint8:
                d["masks"] = d["masks"].to(torch.uint8)
            out_targets.append(d)
    return out_images, out_targets


# ----------------------------------------------------------------------------------------------
# model


def build_model(preset: Preset) -> torch.nn.Module:
    from . import maskrcnn_resnet_fpn
    return maskrcnn_resnet_fpn(**preset.model)


def param_checksum(model: torch.nn.Module) -> float:
    """Sum of all parameters and buffers in float64: equal on replicas that are in sync."""
    total = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                total += t.detach().double().sum().cpu()
    return float(total)


# ----------------------------------------------------------------------------------------------
# checkpoints


def _temp_file_for(path: str, directory: str):
    """A new temporary file next to ``path`` (hidden name, ``.tmp`` suffix) with the
    permissions an ordinary new file would get (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666 & ~umask)
    return fd, tmp


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary file in the same directory, then os.replace: readers see the
    old file or the complete new one, never a partial one; the temporary is removed on failure."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = _temp_file_for(path, directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(text: str, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = _temp_file_for(path, directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def prune_checkpoints(out_dir: str, keep: int) -> None:
    """Deletes all but the newest ``keep`` periodic checkpoints (0: keep all)."""
    if keep <= 0:
        return
    names = sorted(f for f in os.listdir(out_dir) if f.startswith("checkpoint_") and f.endswith(".pth"))
    for name in names[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(out_dir, name))


def load_checkpoint(path: str) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def find_resume_checkpoint(out_dir: str) -> Optional[str]:
    """The newest checkpoint of a run directory: the one ``last_checkpoint`` names, else
    ``model_final.pth``."""
    marker = os.path.join(out_dir, "last_checkpoint")
    if os.path.exists(marker):
        with open(marker) as f:
            name = f.read().strip()
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            return path
    final = os.path.join(out_dir, "model_final.pth")
    return final if os.path.exists(final) else None


# ----------------------------------------------------------------------------------------------
# evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, info: DistInfo, batch_size: int = 2,
             mask_thresh: float = 0.5, max_images: int = 0) -> Optional[Dict[str, Any]]:
    """COCO bbox and segm AP (instseg_ops.models.data.Evaluator, masks thresholded at
    ``mask_thresh``) on ``dataset`` (its first ``max_images`` images if > 0): every rank predicts its shard of the images and turns its
    outputs into COCO results (RLE masks); rank 0 gathers them and scores. Returns
    ``{"bbox": {"AP", "AP50", ...}, "segm": {...}}`` on rank 0, None on the others. The
    caller's RNG streams and the model's train/eval mode are preserved."""
    from .data import Evaluator
    net = unwrap(model)
    was_training = net.training
    evaluator = Evaluator(dataset, mask_threshold=mask_thresh)
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    indices = list(range(info.rank, n, info.world_size))
    net.eval()
    try:
        with preserved_rng(info.device):
            for lo in range(0, len(indices), batch_size):
                samples = [dataset[i] for i in indices[lo:lo + batch_size]]
                images, _ = _to_model_inputs([s[0] for s in samples], None, info.device)
                outputs = net(images)
                evaluator.update({int(s[1]["image_id"]): {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                                                          for k, v in o.items()}
                                  for s, o in zip(samples, outputs)})
    finally:
        net.train(was_training)
    parts = all_gather_objects((evaluator.results, sorted(evaluator.img_ids)), info)
    if not info.is_main:
        return None
    evaluator.reset()
    for results, img_ids in parts:
        for iou_type, res in results.items():
            evaluator.results[iou_type].extend(res)
        evaluator.img_ids.update(img_ids)
    return evaluator.summarize()


# ----------------------------------------------------------------------------------------------
# logging


class MetricsLog:
    """Appends JSON lines to RUN_DIR/metrics.jsonl (rank 0 only)."""

    def __init__(self, path: Optional[str], truncate_after: Optional[int] = None):
        self.path = path
        self.file = None
        if path is None:
            return
        if truncate_after is not None and os.path.exists(path):
            # Resuming: drop records of iterations after the checkpoint (they will be redone).
            keep = []
            with open(path) as f:
                for line in f:
                    line = line.strip()
                    if not line:
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if rec.get("iter", 0) <= truncate_after:
                        keep.append(line)
            atomic_write_text("".join(line + "\n" for line in keep), path)
        self.file = open(path, "a")

    def write(self, record: Dict[str, Any]) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record, sort_keys=True) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(0.0, seconds))))


# ----------------------------------------------------------------------------------------------
# training


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


def train(preset: Preset, data_dir: str, out_dir: str, *, resume: bool = False, resume_from: Optional[str] = None,
          device: Optional[str] = None, seed: int = 0, datasets=None, keep_checkpoints: int = 3,
          log=print) -> Dict[str, Any]:
    """Runs (or resumes) training; returns ``{"iteration", "losses" (per iteration, this run),
    "eval" (last evaluation or None), "checksums" (per rank)}`` on every rank. ``datasets``:
    optional ``(train, val, categories)`` instead of reading ``data_dir``; ``keep_checkpoints``:
    how many periodic checkpoints to keep (0: all; model_final.pth is always kept)."""
    t_begin = time.perf_counter()  # the time budget counts from here (data loading included)
    info = setup_distributed(device)
    dev = info.device
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = False
    if info.is_main:
        os.makedirs(out_dir, exist_ok=True)

    train_set, val_set, categories = datasets if datasets is not None else build_datasets(data_dir, preset)
    num_classes = getattr(train_set, "num_classes", None)
    if num_classes is not None and num_classes != preset.model.get("num_classes"):
        if info.is_main:
            log(f"the data has {num_classes - 1} categories: num_classes {preset.model.get('num_classes')} -> "
                f"{num_classes}")
        preset.model["num_classes"] = num_classes

    # Identical initial weights on every rank, then per-rank training randomness.
    seed_everything(seed)
    model = build_model(preset).to(dev)
    seed_everything(seed + 7919 * info.rank)
    optimizer, scheduler = build_optimizer(model, preset)
    use_amp = bool(preset.amp)
    amp_device = "cuda" if dev.type == "cuda" else "cpu"
    amp_dtype = torch.float16 if dev.type == "cuda" else torch.bfloat16
    scaler = torch.amp.GradScaler(amp_device, enabled=use_amp and dev.type == "cuda")

    start_iter = 0
    budget_used_before = 0.0
    budget = 60.0 * float(preset.time_budget or 0.0)
    if budget > 0:
        if preset.schedule != "step":
            raise ValueError("a time budget needs the step schedule (its decays come at fractions of the budget)")
        if budget <= preset.budget_reserve_s:
            raise ValueError(f"time budget {budget:.0f} s is not larger than its reserve "
                             f"({preset.budget_reserve_s:.0f} s for the final evaluation)")
    check_scale_schedule(preset.scale_schedule)
    if preset.scale_schedule and not hasattr(model, "transform"):
        raise ValueError(f"scale_schedule needs a model with a DetectionTransform, got {type(model).__name__}")
    ckpt_path = resume_from or (find_resume_checkpoint(out_dir) if resume else None)
    if resume and ckpt_path is None and info.is_main:
        log(f"--resume: no checkpoint in {out_dir}, starting from scratch")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_iter = int(ckpt["iteration"])
        budget_used_before = float(ckpt.get("budget_elapsed", 0.0))
        data_state = ckpt.get("data", {})
        if data_state.get("seed", seed) != seed or data_state.get("global_batch",
                                                                  preset.batch_size * info.world_size) \
                != preset.batch_size * info.world_size:
            if info.is_main:
                log("warning: resuming with a different seed or global batch size; the data order changes")
        rng = ckpt.get("rng_per_rank") or []
        if len(rng) == info.world_size:
            set_rng_state(rng[info.rank], dev)
        elif rng:
            if info.is_main:
                log(f"warning: checkpoint has RNG states of {len(rng)} ranks, running {info.world_size}")
            set_rng_state(rng[info.rank % len(rng)], dev)
        if info.is_main:
            log(f"resumed from {ckpt_path} at iteration {start_iter}")
        del ckpt

    if budget > 0 and ckpt_path is None:
        scheduler.milestones = []  # set as the budget's fractions pass (budget_milestones)

    def budget_used_here() -> float:
        """Seconds of the time budget this rank has used (earlier runs of a resumed one included)."""
        return budget_used_before + time.perf_counter() - t_begin

    def budget_used() -> float:
        """Seconds of the time budget used so far (the largest over ranks, so that all stop together)."""
        used = budget_used_here()
        if info.distributed:
            t = torch.tensor([used], dtype=torch.float64, device=dev)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            used = float(t.item())
        return used

    if info.distributed:
        ddp_kwargs = {"device_ids": [dev.index]} if dev.type == "cuda" else {}
        model = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    model.train()

    batches = ShardedBatches(len(train_set), preset.batch_size, seed, info.rank, info.world_size, start=start_iter)
    loader = DataLoader(SeededDataset(train_set), batch_sampler=batches, num_workers=preset.workers,
                        collate_fn=collate_lists, pin_memory=dev.type == "cuda",
                        generator=torch.Generator(), persistent_workers=False,
                        prefetch_factor=2 if preset.workers > 0 else None)

    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl") if info.is_main else None,
                         truncate_after=start_iter if ckpt_path is not None else None)
    if info.is_main:
        header = {"iter": start_iter, "config": preset.to_dict(), "world_size": info.world_size, "seed": seed,
                  "device": str(dev)}
        if ckpt_path is not None:
            header["resumed_from"] = os.path.abspath(ckpt_path)
        metrics.write(header)

    def save_checkpoint(iteration: int, path: str) -> None:
        rng_all = all_gather_objects(get_rng_state(dev), info)
        if not info.is_main:
            return
        state = {
            "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "iteration": iteration, "rng_per_rank": rng_all, "data": batches.state_dict(iteration),
            "preset": preset.to_dict(), "categories": {int(k): str(v) for k, v in (categories or {}).items()},
            "seed": seed, "world_size": info.world_size,
            "budget_elapsed": budget_used_here(),
        }
        atomic_save(state, path)

    def sync_check(iteration: int) -> List[float]:
        sums = all_gather_objects(param_checksum(unwrap(model)), info)
        if info.is_main:
            metrics.write({"iter": iteration, "replica_checksums": sums})
            if len(set(sums)) > 1:
                log(f"warning: replicas differ at iteration {iteration}: {sums}")
        return sums

    def run_eval(iteration: int, final: bool = False):
        if val_set is None or len(val_set) == 0:
            return None
        t0 = time.perf_counter()
        max_images = 0 if final else preset.eval_images
        result = evaluate(model, val_set, info, max_images=max_images)
        if info.is_main and result is not None:
            n = min(len(val_set), max_images) if max_images > 0 else len(val_set)
            metrics.write({"iter": iteration, "eval": result, "eval_images": n,
                           "eval_time": time.perf_counter() - t0})
            log(f"eval @ {iteration}: " + ", ".join(f"{k} {v:.4f}" for k, v in _headline(result).items()))
        return result

    losses_run: List[Dict[str, float]] = []
    last_eval = None
    iteration = start_iter
    t_start = time.perf_counter()
    window: List[float] = []
    data_iter = iter(loader)
    try:
        stopped_by_budget = False
        usable = budget - preset.budget_reserve_s  # the rest is kept for the final checkpoint and evaluation
        fracs = sorted(preset.budget_milestones)
        train_scale = None
        while iteration < preset.iters:
            frac = iteration / preset.iters
            if budget > 0:
                # Stop early enough for the final checkpoint and evaluation; decay the learning
                # rate as the budget's fractions pass (the scheduler applies it from the next step).
                frac = budget_used() / usable
                if frac >= 1.0:
                    stopped_by_budget = True
                    break
                while len(scheduler.milestones) < len(fracs) and frac >= fracs[len(scheduler.milestones)]:
                    scheduler.milestones.append(max(iteration, 1))
                    if info.is_main:
                        log(f"time budget {100 * frac:.0f}% used: learning rate x{preset.gamma} from iteration "
                            f"{iteration + 1}", flush=True)
            if preset.scale_schedule:
                # Progressive resizing (the fraction is the same on every rank: the budget's is
                # the maximum over ranks).
                new_scale = scale_at(preset.scale_schedule, frac)
                if new_scale != train_scale:
                    train_scale = new_scale
                    unwrap(model).transform.train_scale = new_scale
                    if info.is_main:
                        log(f"training images at {new_scale:g}x the model's size from iteration {iteration + 1}",
                            flush=True)
            t0 = time.perf_counter()
            images, targets = next(data_iter)
            images, targets = _to_model_inputs(images, targets, dev)
            t_data = time.perf_counter() - t0

            with torch.autocast(amp_device, dtype=amp_dtype, enabled=use_amp):
                loss_dict = model(images, targets)
            loss = sum(v.float() for v in loss_dict.values())
            if not torch.isfinite(loss).item() and not scaler.is_enabled():
                raise FloatingPointError(f"non-finite loss at iteration {iteration + 1}: "
                                         f"{ {k: float(v) for k, v in loss_dict.items()} }")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            grad_norm = None
            if preset.clip_grad:
                scaler.unscale_(optimizer)
                params = [p for p in model.parameters() if p.grad is not None]
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, preset.clip_grad))
            scaler.step(optimizer)
            scaler.update()
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            iteration += 1

            # Losses averaged over ranks for logging.
            names = sorted(loss_dict)
            vec = torch.stack([loss_dict[k].detach().float() for k in names])
            if info.distributed:
                dist.all_reduce(vec)
                vec /= info.world_size
            vals = {k: float(v) for k, v in zip(names, vec.cpu())}
            total = float(sum(vals.values()))
            local = {k: float(loss_dict[k].detach()) for k in names}
            losses_run.append({"iter": iteration, "loss": total, **vals, "local_loss": float(loss.detach())})
            dt = time.perf_counter() - t0
            window = (window + [dt])[-20:]
            if info.is_main:
                rec = {"iter": iteration, "loss": total, "losses": vals, "lr": lr, "time": dt, "data_time": t_data,
                       "elapsed": time.perf_counter() - t_start}
                if info.distributed:
                    rec["rank0_losses"] = local
                if grad_norm is not None:
                    rec["grad_norm"] = grad_norm
                if scaler.is_enabled():
                    rec["loss_scale"] = float(scaler.get_scale())
                metrics.write(rec)
                if iteration == start_iter + 1 or iteration % max(1, preset.log_period) == 0 \
                        or iteration == preset.iters:
                    per_it = sorted(window)[len(window) // 2]
                    eta = format_eta(per_it * (preset.iters - iteration) if budget <= 0 else
                                     usable - budget_used_here())
                    parts = " ".join(f"{LOSS_SHORT.get(k, k)} {v:.4f}" for k, v in vals.items())
                    mem = ""
                    if dev.type == "cuda":
                        mem = f"  mem {torch.cuda.max_memory_allocated(dev) / 2 ** 20:.0f}M"
                    log(f"[{preset.name}] iter {iteration}/{preset.iters}  loss {total:.4f} ({parts})  lr {lr:.2e}  "
                        f"{per_it:.3f} s/it (data {t_data:.3f})  eta {eta}{mem}", flush=True)

            if preset.eval_period and iteration % preset.eval_period == 0 and iteration < preset.iters:
                last_eval = run_eval(iteration)
            if preset.checkpoint_period and iteration % preset.checkpoint_period == 0 and iteration < preset.iters:
                name = f"checkpoint_{iteration:07d}.pth"
                save_checkpoint(iteration, os.path.join(out_dir, name))
                if info.is_main:
                    atomic_write_text(name + "\n", os.path.join(out_dir, "last_checkpoint"))
                    prune_checkpoints(out_dir, keep_checkpoints)
                sync_check(iteration)

        save_checkpoint(iteration, os.path.join(out_dir, "model_final.pth"))
        if info.is_main:
            atomic_write_text("model_final.pth\n", os.path.join(out_dir, "last_checkpoint"))
        sums = sync_check(iteration)
        if iteration > start_iter or last_eval is None:
            last_eval = run_eval(iteration, final=True)
        if info.is_main:
            elapsed = time.perf_counter() - t_start
            metrics.write({"iter": iteration, "done": True, "elapsed": elapsed,
                           "stopped_by_time_budget": stopped_by_budget,
                           "budget_elapsed": budget_used_here()})
            log(f"done: {iteration} iterations, {format_eta(elapsed)} this run; {out_dir}/model_final.pth")
    finally:
        metrics.close()
        del data_iter
    return {"iteration": iteration, "losses": losses_run, "eval": last_eval, "checksums": sums}


def _headline(result: Dict[str, Any]) -> Dict[str, float]:
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


# ----------------------------------------------------------------------------------------------
# command line


def parse_scale_schedule(text: str) -> Tuple[Tuple[float, float], ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        out = tuple((float(f), float(v)) for f, v in (part.split(":") for part in text.split(",")))
        check_scale_schedule(out)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"bad scale schedule {text!r} (want FRACTION:SCALE[,...]): {e}")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m instseg_ops.models.train", description=__doc__.split("\n")[0])
    p.add_argument("--preset", required=True, choices=preset_names())
    p.add_argument("--data", required=True, help="data directory (train/val images and COCO annotations)")
    p.add_argument("--out", required=True, help="run directory: metrics.jsonl, checkpoints, model_final.pth")
    p.add_argument("--iters", type=int, help="total iterations (milestones scale with it)")
    p.add_argument("--batch-size", type=int, help="images per process")
    p.add_argument("--lr", type=float, help="base learning rate")
    p.add_argument("--optimizer", choices=sorted(OPTIMIZERS), help="SGD with momentum, or AdamW")
    p.add_argument("--weight-decay", type=float, help="weight decay (not on normalisation parameters and biases)")
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
                     eval_images=args.eval_images,
                     checkpoint_period=args.checkpoint_every, log_period=args.log_every, amp=args.amp,
                     workers=args.workers, cache_data=args.cache_data, scale_schedule=args.scale_schedule)
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
