"""Image transform of the two-stage detectors: normalise, resize, batch (padded to a multiple
of 32); and the way back: boxes to the original sizes, masks pasted with instseg_ops."""
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .poolers import RoIGeometry


def scale_boxes(boxes: Tensor, old: Sequence[int], new: Sequence[int]) -> Tensor:
    rh = torch.tensor(new[0], dtype=torch.float32, device=boxes.device) / torch.tensor(old[0], dtype=torch.float32,
                                                                                        device=boxes.device)
    rw = torch.tensor(new[1], dtype=torch.float32, device=boxes.device) / torch.tensor(old[1], dtype=torch.float32,
                                                                                        device=boxes.device)
    x0, y0, x1, y1 = boxes.unbind(1)
    return torch.stack((x0 * rw, y0 * rh, x1 * rw, y1 * rh), dim=1)


class DetectionTransform(nn.Module):
    """Resizes each image so that its short side is ``min_size`` (in training: one of
    ``min_size``, drawn with torch's RNG) unless its long side would exceed ``max_size``,
    normalises with ``image_mean`` / ``image_std`` and pads the batch to a multiple of
    ``size_divisible``. Targets' boxes are scaled and masks resized (nearest).

    ``channels_last``: the batch's memory format (the convolutions, RoIAlign and the heads
    follow the input's format; the values are the same up to float rounding). ``None``
    (default): channels_last for CPU batches, where oneDNN's convolutions run about 15-20%
    faster in it, the standard layout elsewhere.

    ``train_scale``: in training mode the resize factor is multiplied by it (progressive
    resizing: the trainer lowers it for the first part of a run, see ``Preset.scale_schedule``);
    evaluation always uses the full size.

    ``geometry`` (``RoIGeometry``, shared with the second stage): how ``postprocess`` pastes
    masks and how training masks are resized."""

    def __init__(self, min_size, max_size: int, image_mean: Sequence[float], image_std: Sequence[float],
                 size_divisible: int = 32, channels_last: Optional[bool] = None,
                 geometry: RoIGeometry = RoIGeometry()):
        super().__init__()
        self.min_size = tuple(min_size) if isinstance(min_size, (list, tuple)) else (min_size,)
        self.max_size = max_size
        self.image_mean, self.image_std = list(image_mean), list(image_std)
        self.size_divisible = size_divisible
        self.channels_last = channels_last
        self.train_scale = 1.0
        self.geometry = geometry

    @property
    def aligned(self) -> bool:
        return self.geometry.aligned

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"images must be floating point tensors in [0, 1], got {image.dtype}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]]):
        h, w = image.shape[-2:]
        if self.training:
            size = self.min_size[int(torch.empty(1).uniform_(0.0, float(len(self.min_size))).item())]
        else:
            size = self.min_size[-1]
        scale = min(size / min(h, w), self.max_size / max(h, w))
        if self.training:
            scale *= self.train_scale
        image = F.interpolate(image[None], scale_factor=scale, mode="bilinear", recompute_scale_factor=True,
                              align_corners=False)[0]
        if target is not None:
            target = dict(target)
            target["boxes"] = scale_boxes(target["boxes"], (h, w), image.shape[-2:])
            if "masks" in target:
                m = target["masks"]
                target["masks"] = F.interpolate(m[:, None].float(), scale_factor=scale,
                                                mode=self.geometry.mask_resize_mode,
                                                recompute_scale_factor=True)[:, 0].byte()
        return image, target

    def batch(self, images: List[Tensor]) -> Tensor:
        c = max(i.shape[0] for i in images)
        h = int(math.ceil(max(i.shape[1] for i in images) / self.size_divisible) * self.size_divisible)
        w = int(math.ceil(max(i.shape[2] for i in images) / self.size_divisible) * self.size_divisible)
        out = images[0].new_zeros((len(images), c, h, w))
        for b, img in zip(out, images):
            b[: img.shape[0], : img.shape[1], : img.shape[2]].copy_(img)
        cl = self.channels_last if self.channels_last is not None else out.device.type == "cpu"
        return out.contiguous(memory_format=torch.channels_last) if cl else out

    def forward(self, images: List[Tensor], targets: Optional[List[Dict[str, Tensor]]] = None):
        images = [img for img in images]
        targets = None if targets is None else [dict(t) for t in targets]
        for i, img in enumerate(images):
            if img.dim() != 3:
                raise ValueError(f"images must be a list of Tensor[C, H, W], got shape {tuple(img.shape)}")
            t = None if targets is None else targets[i]
            img, t = self.resize(self.normalize(img), t)
            images[i] = img
            if targets is not None:
                targets[i] = t
        sizes = [tuple(img.shape[-2:]) for img in images]
        return self.batch(images), sizes, targets

    def postprocess(self, results: List[Dict[str, Tensor]], sizes: List[Tuple[int, int]],
                    original_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        for r, size, orig in zip(results, sizes, original_sizes):
            r["boxes"] = scale_boxes(r["boxes"], size, orig)
            if "masks" in r:
                r["masks"] = self.geometry.paste(r["masks"], r["boxes"], orig)[:, None]
        return results
