"""SAM's training losses (the paper's recipe; no official training code exists): for each
image, up to ``max_instances`` ground-truth instances are each prompted by a box (jittered
ground-truth box) or by one positive point drawn from the mask; the three multimask outputs
are scored with 20 x focal + dice against the mask (at the decoder's low resolution) and
only the lowest-loss output is back-propagated; the IoU head regresses (MSE) the true IoU of
each output's binarised mask. Iterative point sampling (corrective clicks) is not done yet."""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss averaged over the last two dims: (..., H, W) -> (...)."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.mean((-1, -2))


def dice_loss(logits: Tensor, target: Tensor, eps: float = 1.0) -> Tensor:
    p = torch.sigmoid(logits).flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + eps) / (p.sum(-1) + t.sum(-1) + eps)


def sam_losses(model, images: List[Tensor], targets: List[Dict[str, Tensor]], max_instances: int = 8,
               box_prob: float = 0.5, box_jitter: float = 0.1, focal_weight: float = 20.0,
               generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
    """``images``: (3, H, W) floats in [0, 1] (the trainer's) or [0, 255]; ``targets``: dicts
    with ``masks`` (N, H, W) and ``boxes`` (N, 4). Returns ``loss_focal``, ``loss_dice``,
    ``loss_iou``."""
    dev = model.device
    size = model.image_encoder.img_size
    batch, gts, scales = [], [], []
    for img, tgt in zip(images, targets):
        h, w = img.shape[-2:]
        scale = size / max(h, w)
        nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        x = img.float() * (255.0 if img.is_floating_point() and img.max() <= 1.0 else 1.0)
        x = F.interpolate(x[None], (nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        batch.append(model.preprocess(x))
        masks = tgt["masks"].float()
        masks = F.interpolate(masks[None], (nh, nw), mode="nearest")[0] if len(masks) else masks.new_zeros(0, nh, nw)
        masks = F.pad(masks, (0, size - nw, 0, size - nh))
        gts.append(masks)
        scales.append(torch.tensor([nw / w, nh / h], device=dev))
    emb = model.image_encoder(torch.stack(batch))
    pe = model.prompt_encoder.get_dense_pe()
    low = tuple(model.prompt_encoder.mask_input_size)
    focal_all, dice_all, iou_all = [], [], []
    for i, masks in enumerate(gts):
        keep = masks.flatten(1).sum(1) > 0
        masks = masks[keep]
        if len(masks) == 0:
            continue
        sel = torch.randperm(len(masks), generator=generator)[:max_instances].to(dev)
        masks = masks[sel]
        k = len(masks)
        boxes = targets[i]["boxes"][keep][sel].float() * scales[i].repeat(2)
        use_box = torch.rand(k, generator=generator).to(dev) < box_prob
        # box prompts: the ground-truth box jittered by up to box_jitter of its side
        wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
        noise = (torch.rand(k, 4, generator=generator).to(dev) * 2 - 1) * box_jitter * wh
        jittered = (boxes + noise).clamp(min=0, max=size)
        # point prompts: one positive point uniformly from the mask
        flat = masks.flatten(1)
        r = torch.rand(flat.shape, generator=generator).to(dev) * flat
        idx = r.argmax(1)
        pts = torch.stack([idx % size, idx // size], 1).float()
        pts_in = pts[:, None, :]
        labels = torch.ones(k, 1, dtype=torch.int, device=dev)
        # one decoder call for the point-prompted instances, one for the box-prompted
        logits = []
        for prompt_box in (False, True):
            chosen = use_box if prompt_box else ~use_box
            if not chosen.any():
                continue
            sparse, dense = model.prompt_encoder(None if prompt_box else (pts_in[chosen], labels[chosen]),
                                                 jittered[chosen] if prompt_box else None, None)
            lo, io = model.mask_decoder(emb[i:i + 1], pe, sparse, dense, multimask_output=True)
            logits.append((chosen.nonzero().flatten(), lo, io))
        order = torch.cat([c for c, _, _ in logits])
        lo = torch.cat([x for _, x, _ in logits])[order.argsort()]
        io = torch.cat([x for _, _, x in logits])[order.argsort()]
        target = F.interpolate(masks[:, None], low, mode="bilinear", align_corners=False)[:, 0]
        target = (target > 0.5).float()[:, None].expand_as(lo)
        focal = focal_loss(lo, target)
        dice = dice_loss(lo, target)
        best = (focal_weight * focal + dice).argmin(1, keepdim=True)
        focal_all.append(focal.gather(1, best).flatten())
        dice_all.append(dice.gather(1, best).flatten())
        with torch.no_grad():
            pred = lo > model.mask_threshold
            inter = (pred & (target > 0)).flatten(2).sum(-1).float()
            union = (pred | (target > 0)).flatten(2).sum(-1).float()
            true_iou = inter / union.clamp(min=1)
        iou_all.append(((io - true_iou) ** 2).mean(1))
    if not focal_all:   # no instance in the batch: zero losses that still touch every head
        zero = emb.sum() * 0.0
        return {"loss_focal": zero, "loss_dice": zero, "loss_iou": zero}
    return {"loss_focal": focal_weight * torch.cat(focal_all).mean(), "loss_dice": torch.cat(dice_all).mean(),
            "loss_iou": torch.cat(iou_all).mean()}
