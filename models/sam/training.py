"""SAM's training (the paper's recipe; no official training code exists) and the shapes preset.

``sam_losses(model, images, targets)``: for each image, up to ``max_instances`` ground-truth
instances are each prompted first by a jittered ground-truth box or by one positive point
drawn from the mask (equal probability). Then, as the paper's simulated interactive
segmentation, ``point_iters`` corrective points are added one per iteration, each drawn
uniformly from the error region of the previous prediction (positive where the previous mask
missed the object, negative where it covered background), with the previous prediction's
low-resolution logits (unthresholded, detached) fed back as the mask prompt; ``mask_iters``
iterations add no point (one at the end, the others at random places among the points), so
the model learns to refine its own mask. Every iteration is supervised:

- the first prompt: the three multimask outputs scored with 20 x focal + dice, only the
  lowest-loss one back-propagated; for a box prompt also the single-mask output (token 0),
  which ``multimask_output=False`` returns and the box-prompt evaluation reads (the paper
  returns the multimask outputs for any single prompt; segment-anything's box examples use the
  single output);
- later iterations (several prompts): the single-mask output only, as the paper;
- the IoU head: mean squared error to the true IoU of every output that was scored.

Losses are on the decoder's low-resolution logits against the ground truth area-resampled to
that grid (a cell is foreground when at least half its pixels are), or, with
``full_res_loss=True``, on the logits upsampled bilinearly to the input
size against the ground truth there, which is what evaluation and the predictor threshold
(SAM 2's training code also upsamples to the targets). ``loss_focal`` (already x
``focal_weight``), ``loss_dice``, ``loss_iou`` are means over all scored masks; the IoU
head's target is the IoU at the same resolution.

``TrainableSam`` is a ``Sam`` that keeps these options (its state dict is the official one)
and evaluates itself with prompts (``evaluate.evaluate_prompts``); ``sam_tiny_shapes`` builds
the preset ``shapes_sam_tiny_cpu``'s model."""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine.presets import Preset, register_preset
from ..registry import register_model
from .model import TINY_CONFIG, Sam, build_sam


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


def prepare_images(model: Sam, images: Sequence[Tensor]) -> Tuple[Tensor, List[Tuple[int, int]]]:
    """(3, H, W) images (floats in [0, 1], as the trainer's data loader gives, or pixel values in
    [0, 255]) -> the encoder's batch (resized so the longest side is ``img_size``, bilinear with
    antialiasing, normalised, padded bottom-right) and each image's resized (h, w)."""
    size = model.image_encoder.img_size
    batch, sizes = [], []
    for img in images:
        if img.dim() != 3 or img.shape[0] != 3 or img.shape[1] == 0 or img.shape[2] == 0:
            raise ValueError(f"SAM: expected (3, H, W) images, got shape {tuple(img.shape)}")
        h, w = img.shape[-2:]
        scale = size / max(h, w)
        nh, nw = max(1, int(h * scale + 0.5)), max(1, int(w * scale + 0.5))
        x = img.float().to(model.device)
        if img.is_floating_point() and float(x.max()) <= 1.0:
            x = x * 255.0
        if (nh, nw) != (h, w):
            x = F.interpolate(x[None], (nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
        batch.append(model.preprocess(x))
        sizes.append((nh, nw))
    return torch.stack(batch), sizes


def sample_error_points(pred: Tensor, gt: Tensor, valid: Optional[Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """One corrective click per mask: a pixel drawn uniformly from the error region of the
    prediction ``pred`` (K, H, W) bool against ``gt`` (K, H, W) bool, inside ``valid`` ((H, W)
    or (K, H, W) bool, e.g. the unpadded image) when given. Returns ``coords`` (K, 2) float XY
    pixel indices and ``labels`` (K,) int64: 1 where the pixel is a false negative (object
    the prediction missed), 0 where it is a false positive; a mask without error gets label
    -1 at (0, 0), which the prompt encoder embeds as "not a point"."""
    if pred.shape != gt.shape or pred.dim() != 3:
        raise ValueError(f"sample_error_points: pred and gt must be (K, H, W) of one shape, got "
                         f"{tuple(pred.shape)} and {tuple(gt.shape)}")
    pred, gt = pred.bool(), gt.bool()
    err = pred != gt
    if valid is not None:
        err = err & valid.bool().to(err.device)
    k, _, w = err.shape
    flat = err.flatten(1)
    if k == 0 or flat.shape[1] == 0:
        return torch.zeros(k, 2, device=pred.device), torch.full((k,), -1, dtype=torch.long, device=pred.device)
    # every error pixel gets a key in [1, 2), the others 0: the arg max is uniform over the errors
    keys = torch.rand(flat.shape, generator=generator).to(flat.device) + 1.0
    idx = torch.where(flat, keys, keys.new_zeros(())).argmax(1)
    has_error = flat.any(1)
    positive = gt.flatten(1).gather(1, idx[:, None])[:, 0]
    labels = torch.where(has_error, positive.long(), torch.full_like(idx, -1))
    coords = torch.stack([idx % w, idx // w], 1).float() * has_error[:, None]
    return coords, labels


def interaction_schedule(point_iters: int, mask_iters: int, generator: Optional[torch.Generator] = None
                         ) -> List[bool]:
    """The iterations after the first prompt: True adds a corrective point, False only feeds
    the previous mask back. As the paper: one mask-only iteration at the end, any others at
    random places among the points."""
    if point_iters < 0 or mask_iters < 0:
        raise ValueError(f"point_iters and mask_iters must be >= 0, got {point_iters} and {mask_iters}")
    steps = [True] * point_iters
    for _ in range(max(0, mask_iters - 1)):
        pos = int(torch.randint(0, len(steps) + 1, (1,), generator=generator))
        steps.insert(pos, False)
    if mask_iters > 0:
        steps.append(False)
    return steps


def _mask_stats(logits: Tensor, target: Tensor, focal_weight: float):
    """focal, dice (each (K, M)) and the true IoU (no grad) of logits (K, M, h, w) against
    target (K, 1, H, W) in {0, 1}; logits are resized bilinearly to (H, W) when the sizes
    differ (upsampled, as ``postprocess_masks`` does before thresholding)."""
    if target.shape[-2:] != logits.shape[-2:]:
        logits = F.interpolate(logits, target.shape[-2:], mode="bilinear", align_corners=False)
    tgt = target.expand_as(logits)
    focal = focal_loss(logits, tgt)
    dice = dice_loss(logits, tgt)
    with torch.no_grad():
        pred = logits > 0
        inter = (pred & (tgt > 0)).flatten(2).sum(-1).float()
        union = (pred | (tgt > 0)).flatten(2).sum(-1).float()
        iou = inter / union.clamp(min=1)
    return focal, dice, iou


def sam_losses(model: Sam, images: List[Tensor], targets: List[Dict[str, Tensor]], max_instances: int = 8,
               box_prob: float = 0.5, box_jitter: float = 0.1, focal_weight: float = 20.0, point_iters: int = 2,
               mask_iters: int = 1, iou_weight: float = 1.0, full_res_loss: bool = False,
               generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
    """``images``: (3, H, W) floats in [0, 1] (the trainer's) or [0, 255]; ``targets``: dicts
    with ``masks`` (N, H, W) and ``boxes`` (N, 4) XYXY in the image's pixels. Returns
    ``loss_focal``, ``loss_dice``, ``loss_iou`` (see the module's description)."""
    if len(images) != len(targets):
        raise ValueError(f"{len(images)} images but {len(targets)} targets")
    dev = model.device
    size = model.image_encoder.img_size
    x, sizes = prepare_images(model, images)
    emb = model.image_encoder(x)
    pe = model.prompt_encoder.get_dense_pe()
    low = tuple(model.prompt_encoder.mask_input_size)
    cell = (size / low[1], size / low[0])   # input pixels per low-resolution cell (x, y)

    # Instances of the whole batch, prompted together: masks at the input size (padded), their
    # low-resolution targets, boxes in input pixels, the valid (unpadded) cells.
    img_idx, gt_in, boxes_in, valid_low = [], [], [], []
    for i, (img, tgt) in enumerate(zip(images, targets)):
        h, w = img.shape[-2:]
        nh, nw = sizes[i]
        masks = tgt["masks"]
        if masks.shape[0] == 0:
            continue
        if masks.shape[-2:] != (h, w):
            raise ValueError(f"target {i}: masks of {tuple(masks.shape[-2:])} for an image of {(h, w)}")
        masks = masks.to(dev).float()
        if (nh, nw) != (h, w):
            masks = F.interpolate(masks[None], (nh, nw), mode="nearest")[0]
        masks = F.pad(masks, (0, size - nw, 0, size - nh))
        keep = (masks.flatten(1) > 0).any(1)
        if not bool(keep.any()):
            continue
        sel = keep.nonzero()[:, 0]
        sel = sel[torch.randperm(len(sel), generator=generator)[:max_instances].to(dev)]
        scale = torch.tensor([nw / w, nh / h] * 2, device=dev)
        gt_in.append(masks[sel] > 0.5)
        boxes_in.append(tgt["boxes"].to(dev).float()[sel] * scale)
        img_idx.append(torch.full((len(sel),), i, dtype=torch.long, device=dev))
        rows = torch.arange(low[0], device=dev) * cell[1] < nh
        cols = torch.arange(low[1], device=dev) * cell[0] < nw
        valid_low.append((rows[:, None] & cols[None, :]).expand(len(sel), -1, -1))
    if not gt_in:   # no instance in the batch: zero losses that still touch the encoder
        zero = emb.sum() * 0.0
        return {"loss_focal": zero, "loss_dice": zero, "loss_iou": zero}
    img_idx, gt_in, boxes, valid_low = (torch.cat(img_idx), torch.cat(gt_in), torch.cat(boxes_in),
                                        torch.cat(valid_low))
    k = len(img_idx)
    target = (F.interpolate(gt_in[:, None].float(), low, mode="area") >= 0.5).float()   # (K, 1, h, w)
    # what the losses and the IoU targets compare with: the low-resolution target, or the
    # ground truth at the input size, against logits upsampled to it (full_res_loss)
    scored = gt_in[:, None].float() if full_res_loss else target
    src = emb[img_idx]

    # the first prompt: a jittered box (by up to box_jitter of its side) or one positive point
    use_box = (torch.rand(k, generator=generator) < box_prob).to(dev)
    wh = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
    noise = (torch.rand(k, 4, generator=generator).to(dev) * 2 - 1) * box_jitter * wh
    boxes = (boxes + noise).clamp(min=0, max=size)
    flat = gt_in.flatten(1)
    keys = (torch.rand(flat.shape, generator=generator).to(dev) + 1.0) * flat
    idx = keys.argmax(1)
    first = torch.stack([idx % size, idx // size], 1).float()
    box_ids, point_ids = use_box.nonzero()[:, 0], (~use_box).nonzero()[:, 0]
    order = torch.cat([point_ids, box_ids]).argsort()
    coords = first[point_ids][:, None]                                   # point-first: (P, n, 2)
    labels = torch.ones(len(point_ids), 1, dtype=torch.long, device=dev)
    extra_c = torch.zeros(len(box_ids), 0, 2, device=dev)                # box-first: later points
    extra_l = torch.zeros(len(box_ids), 0, dtype=torch.long, device=dev)

    focal_all, dice_all, iou_all = [], [], []
    mask_in: Optional[Tensor] = None
    for it, add_point in enumerate([False] + interaction_schedule(point_iters, mask_iters, generator)):
        if it > 0 and add_point:
            c, lab = sample_error_points(mask_in[:, 0] > 0, target[:, 0] > 0, valid_low, generator)
            c = (c + 0.5) * torch.tensor(cell, device=dev) - 0.5          # cell centre in input pixels
            c[lab < 0] = 0.0
            coords = torch.cat([coords, c[point_ids][:, None]], 1)
            labels = torch.cat([labels, lab[point_ids][:, None]], 1)
            extra_c = torch.cat([extra_c, c[box_ids][:, None]], 1)
            extra_l = torch.cat([extra_l, lab[box_ids][:, None]], 1)
        # point-first: its points and a padding token; box-first: its points and the two corners;
        # both n + 2 tokens, so that one decoder call takes every instance
        parts = []
        if len(point_ids):
            parts.append(model.prompt_encoder((coords, labels), None,
                                              None if mask_in is None else mask_in[point_ids]))
        if len(box_ids):
            parts.append(model.prompt_encoder((extra_c, extra_l) if extra_c.shape[1] else None, boxes[box_ids],
                                              None if mask_in is None else mask_in[box_ids]))
        sparse = torch.cat([p[0] for p in parts])[order]
        dense = torch.cat([p[1] for p in parts])[order]
        masks, iou_pred = model.mask_decoder.predict_masks(src, pe, sparse, dense)
        if it == 0:
            multi, multi_iou = masks[:, 1:], iou_pred[:, 1:]
            focal, dice, true_iou = _mask_stats(multi, scored, focal_weight)
            best = (focal_weight * focal + dice).argmin(1, keepdim=True)
            focal_all.append(focal.gather(1, best)[:, 0])
            dice_all.append(dice.gather(1, best)[:, 0])
            iou_all.append(((multi_iou - true_iou) ** 2).flatten())
            # the mask handed on: the highest predicted IoU of the three (point-first), the
            # single output (box-first; also supervised, see above)
            prev = multi[torch.arange(k, device=dev), multi_iou.argmax(1)]
            if len(box_ids):
                focal, dice, true_iou = _mask_stats(masks[box_ids, :1], scored[box_ids], focal_weight)
                focal_all.append(focal[:, 0])
                dice_all.append(dice[:, 0])
                iou_all.append(((iou_pred[box_ids, :1] - true_iou) ** 2)[:, 0])
                prev = prev.clone()
                prev[box_ids] = masks[box_ids, 0]
        else:
            focal, dice, true_iou = _mask_stats(masks[:, :1], scored, focal_weight)
            focal_all.append(focal[:, 0])
            dice_all.append(dice[:, 0])
            iou_all.append(((iou_pred[:, :1] - true_iou) ** 2)[:, 0])
            prev = masks[:, 0]
        prev = prev.detach()
        mask_in = prev[:, None]
    return {"loss_focal": focal_weight * torch.cat(focal_all).mean(), "loss_dice": torch.cat(dice_all).mean(),
            "loss_iou": iou_weight * torch.cat(iou_all).mean()}


class TrainableSam(Sam):
    """A ``Sam`` that trains with ``sam_losses`` and the options given here (kept as
    attributes, not in the state dict: checkpoints are the official layout) and evaluates
    itself with prompts: the trainer's final evaluation calls ``evaluate_dataset`` (box- and
    point-prompt mIoU, ``evaluate.evaluate_prompts``) instead of COCO AP."""

    def __init__(self, *args, train_options: Optional[Dict] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.train_options = dict(train_options or {})

    def forward(self, batched_input, multimask_output=True, targets=None):
        if isinstance(multimask_output, (list, tuple)):   # model(images, targets)
            targets, multimask_output = multimask_output, True
        if targets is not None:
            return sam_losses(self, batched_input, targets, **self.train_options)
        return self._forward_official(batched_input, multimask_output)

    def evaluate_dataset(self, dataset, info=None, max_images: int = 0, progress: bool = False):
        from .evaluate import evaluate_prompts
        return evaluate_prompts(self, dataset, info, max_images=max_images, progress=progress)


TRAIN_OPTION_NAMES = ("max_instances", "box_prob", "box_jitter", "focal_weight", "point_iters", "mask_iters",
                      "iou_weight", "full_res_loss")

# The shapes model: TINY_CONFIG (16-px patches: a 16x16 embedding and 64x64 mask logits for the
# 256-px shapes images, 4 px per cell) with 8x8 windows that tile the grid. 8-px patches give
# 2-px cells but a step three times as long, which a 30-minute budget cannot afford (the runs:
# benchmarks/RESULTS.md).
SHAPES_CONFIG = dict(TINY_CONFIG, window_size=8)


@register_model()
def sam_tiny_shapes(num_classes: Optional[int] = None, pos_embed_std: float = 0.02, **overrides) -> TrainableSam:
    """The ``shapes_sam_tiny_cpu`` preset's model: ``sam_vit_tiny`` with 8x8 windows (256 px
    input, 16x16 embedding, 64x64 mask logits), as a ``TrainableSam``. ``num_classes`` (which
    the trainer passes) is ignored: SAM has no classes. Training options (``sam_losses``'
    keywords) and ``build_sam``'s sizes are both accepted as overrides. The absolute position
    embedding starts from a normal of std ``pos_embed_std`` (zeros in the official builder,
    where it is always loaded from a checkpoint)."""
    del num_classes
    options = {k: overrides.pop(k) for k in TRAIN_OPTION_NAMES if k in overrides}
    base = build_sam(**{**SHAPES_CONFIG, **overrides})
    model = TrainableSam(base.image_encoder, base.prompt_encoder, base.mask_decoder, train_options=options)
    if pos_embed_std > 0 and model.image_encoder.pos_embed is not None:
        nn.init.trunc_normal_(model.image_encoder.pos_embed, std=pos_embed_std)
    return model.eval()


# A 30-minute CPU run on the 256-px shapes set (2 threads), box- and point-prompt mIoU on
# val at the end. The choices and the smoke runs behind them: docs/models.md (SAM) and
# benchmarks/RESULTS.md.
register_preset(Preset(
    name="shapes_sam_tiny_cpu",
    arch="sam_tiny_shapes",
    model=dict(max_instances=8, box_prob=0.5, box_jitter=0.1, point_iters=2, mask_iters=1),
    iters=100000, batch_size=4, optimizer="adamw", lr=5e-4, weight_decay=0.1, warmup_iters=100,
    milestones=(80000, 93000), gamma=0.1, time_budget=29.0, budget_reserve_s=60.0, eval_period=500, eval_images=50,
    checkpoint_period=500, log_period=20, workers=0, clip_grad=1.0, cache_data=True, hflip_prob=0.5,
))
