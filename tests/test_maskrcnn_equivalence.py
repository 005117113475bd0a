"""Our Mask R-CNN against torchvision's with the same weights: detections in eval mode, losses
in train mode. Skipped when torchvision is not installed."""
import pytest
import torch

from instseg_ops.models import maskrcnn_resnet50_fpn
from instseg_ops.models.boxes import box_iou

torchvision = pytest.importorskip("torchvision")

SMALL = dict(min_size=320, max_size=512)  # keeps the CPU test fast; both models get it


def pair(train=False, **kw):
    torch.manual_seed(0)
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SMALL, **kw)
    with torch.no_grad():  # random init gives nearly uniform class scores: spread them, in both models alike
        tv.roi_heads.box_predictor.cls_score.weight.mul_(4)
    # torchvision without pretrained weights uses trainable BatchNorm everywhere; match it in
    # train mode (in eval mode, FrozenBatchNorm2d computes the same function).
    ours = maskrcnn_resnet50_fpn(**SMALL, **kw, **(dict(norm="bn", trainable_layers=5) if train else {}))
    ours.load_state_dict(tv.state_dict(), strict=True)
    return (tv.train(), ours.train()) if train else (tv.eval(), ours.eval())


@pytest.fixture(autouse=True)
def stable_tie_order(monkeypatch):
    """torchvision's batched_nms orders boxes of equal score arbitrarily (an unstable sort);
    ours puts the lower index first. Random-init RPNs produce hundreds of tied objectness
    scores, and the tie order decides which proposals the samplers draw. Give torchvision's
    model our documented tie order (same kept boxes, re-sorted stably) so that the comparison
    is about everything else."""
    original = torchvision.ops.boxes.batched_nms

    def stable(boxes, scores, idxs, iou_threshold):
        keep = original(boxes, scores, idxs, iou_threshold).sort().values
        return keep[scores[keep].sort(descending=True, stable=True).indices]

    monkeypatch.setattr(torchvision.ops.boxes, "batched_nms", stable)


def images(seed, sizes):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def test_state_dict_keys_and_shapes_match():
    tv = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)
    ours = maskrcnn_resnet50_fpn()
    tv_sd = {k: v.shape for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert tv_sd == {k: v.shape for k, v in ours.state_dict().items()}
    ours.load_state_dict(tv.state_dict(), strict=True)


def test_eval_detections_match_torchvision(seed):
    tv, ours = pair(box_score_thresh=0.0)
    imgs = images(seed, [(300, 400), (360, 270), (200, 330)])
    with torch.no_grad():
        want, got = tv(imgs), ours(imgs)
    for w, g in zip(want, got):
        assert len(g["boxes"]) == len(w["boxes"]) == 100
        iou = box_iou(g["boxes"], w["boxes"])
        iou[g["labels"][:, None] != w["labels"][None, :]] = 0
        best, idx = iou.max(dim=1)
        matched = best > 0.99
        assert matched.float().mean() >= 0.98, f"only {matched.float().mean():.3f} of ours matched"
        torch.testing.assert_close(g["scores"][matched], w["scores"][idx[matched]], rtol=0, atol=1e-4)
        mad = (g["masks"][matched] - w["masks"][idx[matched]]).abs().mean()
        assert mad < 1e-3, mad
        assert g["masks"].shape[1:] == w["masks"].shape[1:]


def test_train_losses_match_torchvision(seed):
    tv, ours = pair(train=True)
    imgs = images(seed, [(300, 400), (250, 200)])
    g = torch.Generator().manual_seed(seed + 1)
    targets = []
    for img, k in zip(imgs, (3, 0)):
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
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4, msg=lambda m: f"{k}: ours {got[k].item()} torchvision {want[k].item()}")
