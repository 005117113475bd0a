"""Deterministic, resumable data order (sharded over ranks) and the datasets of a run."""
import math
import os
from typing import Dict, Iterator, List

import torch
from torch.utils.data import Dataset

from .rng import preserved_rng, seed_everything


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


def build_datasets(data_dir: str, preset):
    """Training and validation sets of a COCO-layout directory as written by
    ``python -m instseg_ops.models.data.shapes``: ``DIR/{train,val}/*.png`` and
    ``DIR/annotations/instances_{train,val}.json`` (val optional). Returns
    ``(train, val or None, {label: name})``; training images without annotations are left out
    and flipped with ``preset.hflip_prob``."""
    from ..data import CocoInstanceDataset, Compose, RandomHorizontalFlip
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


def to_model_inputs(images, targets, device):
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
