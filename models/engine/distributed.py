"""Distributed helpers: torchrun's environment, object gathering, DDP unwrapping."""
import os
from typing import Any, List, Optional

import torch
import torch.distributed as dist


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
