"""instseg_ops.models' Mask R-CNN against torchvision's with the same weights: detections and
pasted masks in eval mode, the five losses in train mode. Skipped when torchvision is absent.

Random-init weights give near-uniform class scores (every detection scores about 1/91), so
the box classifier's weights are multiplied by 4 in both models alike: scores then spread
over (0, 1) and the top-100 cut, the score threshold and NMS decide something."""
import pytest
import torch

from instseg_ops.models import maskrcnn_resnet50_fpn
from instseg_ops.models.detection.boxes import box_iou

torchvision = pytest.importorskip("torchvision")

EVAL_SIZE = dict(min_size=320, max_size=512)  # small, to keep the CPU test fast; both models get it
TRAIN_SIZE = dict(min_size=256, max_size=384)


def pair(norm="frozen_bn", size=EVAL_SIZE, channels_last=True, **kw):
    """torchvision's model (seed 0) and ours with its state dict loaded strictly. Without
    pretrained weights torchvision builds trainable BatchNorm2d everywhere: ``norm="bn"``
    builds ours alike (batch statistics in train mode); ``norm="frozen_bn"`` (our default)
    computes what BatchNorm2d computes in eval mode.

    Memory format: ours batches CPU images channels_last by default (faster convolutions);
    torchvision's model then gets channels_last weights, which makes its convolutions run
    channels_last too, so that both compute the same float operations. With
    ``channels_last=False`` both use the standard layout."""
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **size, **kw)
    with torch.no_grad():
        tv.roi_heads.box_predictor.cls_score.weight.mul_(4)
    extra = dict(norm="bn", trainable_layers=5) if norm == "bn" else {}
    ours = maskrcnn_resnet50_fpn(**size, **kw, **extra, channels_last=channels_last)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return (tv.to(memory_format=torch.channels_last) if channels_last else tv), ours


@pytest.fixture
def stable_tie_order(monkeypatch):
    """torchvision's batched_nms returns boxes of equal score in an unspecified order (an
    unstable sort); instseg_ops puts the lower index first. A random-init RPN gives many tied
    objectness scores, and in training the samplers draw by position, so the order of tied
    proposals decides which ones are sampled. This keeps the boxes torchvision's NMS keeps
    and only re-sorts them stably, giving torchvision's model instseg_ops' documented order."""
    original = torchvision.ops.boxes.batched_nms

    def stable(boxes, scores, idxs, iou_threshold):
        keep = original(boxes, scores, idxs, iou_threshold).sort().values
        return keep[scores[keep].sort(descending=True, stable=True).indices]

    monkeypatch.setattr(torchvision.ops.boxes, "batched_nms", stable)


def images(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


@pytest.mark.parametrize("channels_last", [True, False], ids=["channels_last", "contiguous"])
def test_eval_detections_and_masks_match_torchvision(seed, channels_last):
    tv, ours = pair(box_score_thresh=0.0, channels_last=channels_last)
    imgs = images(seed, [(300, 400), (360, 270), (200, 330)])
    with torch.no_grad():
        want, got = tv.eval()(imgs), ours.eval()(imgs)
    for w, g, img in zip(want, got, imgs):
        assert set(g) == set(w) == {"boxes", "labels", "scores", "masks"}
        assert len(g["boxes"]) == len(w["boxes"]) == 100
        assert g["masks"].shape == w["masks"].shape == (100, 1) + tuple(img.shape[-2:])
        iou = box_iou(g["boxes"], w["boxes"])
        iou[g["labels"][:, None] != w["labels"][None, :]] = 0
        best, idx = iou.max(dim=1)
        matched = best > 0.99
        frac = matched.float().mean().item()
        score_diff = (g["scores"][matched] - w["scores"][idx[matched]]).abs().max().item()
        mad = (g["masks"][matched] - w["masks"][idx[matched]]).abs().mean().item()
        print(f"matched {frac:.3f}, max score diff {score_diff:.2e}, mask MAD {mad:.2e}, "
              f"max box diff {(g['boxes'][matched] - w['boxes'][idx[matched]]).abs().max().item():.2e}")
        assert frac >= 0.98, f"only {frac:.3f} of ours matched"
        assert score_diff <= 1e-4 and mad < 1e-3


@pytest.mark.parametrize("norm,channels_last", [("bn", False), ("frozen_bn", True)])
def test_train_losses_match_torchvision(seed, norm, channels_last, stable_tie_order):
    tv, ours = pair(norm, TRAIN_SIZE, channels_last)
    tv.train()
    ours.train()
    if norm == "frozen_bn":
        for m in tv.backbone.body.modules():  # running statistics, as our FrozenBatchNorm2d
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
    imgs = images(seed, [(300, 400), (250, 200)])
    g = torch.Generator().manual_seed(seed + 1)
    targets = []
    for img, k in zip(imgs, (3, 0)):  # the second image has no annotations
        h, w = img.shape[-2:]
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
        boxes = torch.cat([xy, xy + torch.rand(k, 2, generator=g) * 80 + 10], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 91, (k,), generator=g), "masks": masks})
    torch.manual_seed(seed)  # the samplers draw the same permutations
    want = tv(imgs, targets)
    torch.manual_seed(seed)
    got = ours(imgs, targets)
    assert set(got) == set(want) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                                     "loss_rpn_box_reg"}
    print(norm, {k: f"{got[k].item():.6f} (diff {abs(got[k].item() - want[k].item()):.1e})" for k in want})
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4,
                                   msg=lambda m: f"{k}: ours {got[k].item()} torchvision {want[k].item()}")
