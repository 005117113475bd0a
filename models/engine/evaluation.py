"""Sharded COCO evaluation of a model on a dataset."""
import sys
from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from .distributed import DistInfo, all_gather_objects, unwrap
from .loader import to_model_inputs
from .rng import preserved_rng


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset, info: DistInfo, batch_size: int = 2,
             mask_thresh: float = 0.5, max_images: int = 0, progress: bool = True) -> Optional[Dict[str, Any]]:
    """COCO bbox and segm AP (instseg_ops.models.data.Evaluator, masks thresholded at
    ``mask_thresh``) on ``dataset`` (its first ``max_images`` images if > 0): every rank predicts
    its shard of the images and turns its
    outputs into COCO results (RLE masks); rank 0 gathers them and scores. Returns
    ``{"bbox": {"AP", "AP50", ...}, "segm": {...}}`` on rank 0, None on the others. The
    caller's RNG streams and the model's train/eval mode are preserved. ``progress``: a tqdm
    bar over rank 0's images (with ETA) when stderr is a terminal. A model with an
    ``evaluate_dataset(dataset, info, max_images=, progress=)`` method is scored by it instead
    (its result is returned as it is; SAM's prompted mIoU)."""
    from ..data import Evaluator
    net = unwrap(model)
    if callable(getattr(net, "evaluate_dataset", None)):
        # a model with its own measure (SAM: prompted mIoU); same sharding, RNG and mode contract
        was_training = net.training
        net.eval()
        try:
            with preserved_rng(info.device):
                return net.evaluate_dataset(dataset, info, max_images=max_images, progress=progress)
        finally:
            net.train(was_training)
    was_training = net.training
    evaluator = Evaluator(dataset, mask_threshold=mask_thresh)
    n = min(len(dataset), max_images) if max_images > 0 else len(dataset)
    indices = list(range(info.rank, n, info.world_size))
    bar = tqdm(total=len(indices), desc="evaluate", unit="img", leave=False,
               disable=not (progress and info.is_main and sys.stderr.isatty()))
    net.eval()
    try:
        with preserved_rng(info.device):
            for lo in range(0, len(indices), batch_size):
                samples = [dataset[i] for i in indices[lo:lo + batch_size]]
                images, _ = to_model_inputs([s[0] for s in samples], None, info.device)
                outputs = net(images)
                evaluator.update({int(s[1]["image_id"]): {k: v.float().cpu() if v.is_floating_point() else v.cpu()
                                                          for k, v in o.items()}
                                  for s, o in zip(samples, outputs)})
                bar.update(len(samples))
    finally:
        bar.close()
        net.train(was_training)
    evaluator.synchronize(lambda obj: all_gather_objects(obj, info))
    return evaluator.summarize() if info.is_main else None
