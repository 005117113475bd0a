"""Mask R-CNN components (instseg_ops.models) on small hand-computed cases, plus model-level
behaviour on a tiny configuration (no torchvision needed)."""
import math

import pytest
import torch

from instseg_ops.models import load_torchvision_weights, maskrcnn_resnet_fpn
from instseg_ops.models.anchors import AnchorGenerator
from instseg_ops.models.boxes import BoxCoder, box_iou
from instseg_ops.models.matcher import BalancedSampler, Matcher


def tiny_model(**kw):
    args = dict(depth=18, num_classes=5, norm="gn", trainable_layers=5, width=8, fpn_channels=16,
                representation_size=32, mask_layers=(16, 16), mask_hidden=16, min_size=96, max_size=128,
                rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100, anchor_sizes=((16,), (32,), (64,), (128,), (256,)))
    args.update(kw)
    return maskrcnn_resnet_fpn(**args)


def test_anchor_grid_by_hand():
    gen = AnchorGenerator(((32,), (64,)), ((1.0, 0.5), (2.0,)))
    # Level 0: 2 x 3 map at stride 16; level 1: 1 x 2 map at stride 32 (image tensor 32 x 64).
    feats = [torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 1, 2)]
    (anchors,) = gen((32, 64), 1, feats)
    # ratio 1, size 32: half 16; ratio 0.5: h = 32 * sqrt(0.5) = 22.6, w = 45.3 -> halves round to 11, 23.
    base0 = torch.tensor([[-16.0, -16, 16, 16], [-23, -11, 23, 11]])
    # ratio 2, size 64: h = 90.5, w = 45.25 -> halves 45 (45.25 rounds to 45) and 23 (22.6).
    base1 = torch.tensor([[-23.0, -45, 23, 45]])
    want = []
    for y in range(2):
        for x in range(4):
            want.append(base0 + torch.tensor([x * 16.0, y * 16, x * 16, y * 16]))
    for x in range(2):
        want.append(base1 + torch.tensor([x * 32.0, 0, x * 32, 0]))
    assert torch.equal(anchors, torch.cat(want))
    assert gen.num_anchors_per_location() == [2, 1]


def test_box_coder_round_trip(seed):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    refs = torch.rand(200, 2) * 500
    refs = torch.cat([refs, refs + torch.rand(200, 2) * 200 + 5], 1).double()
    boxes = torch.rand(200, 2) * 500
    boxes = torch.cat([boxes, boxes + torch.rand(200, 2) * 300 + 5], 1).double()  # < 62.5x the refs
    deltas = coder.encode([boxes], [refs])[0]
    back = coder.decode(deltas, [refs])[:, 0]
    torch.testing.assert_close(back, boxes, rtol=1e-9, atol=1e-9)
    # Hand case: the same box encodes to zeros; a box twice as wide at the same centre gives dw = 5 log 2.
    r = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert torch.equal(coder.encode([r], [r])[0], torch.zeros(1, 4))
    d = coder.encode([torch.tensor([[-5.0, 0.0, 15.0, 20.0]])], [r])[0]
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, 5 * math.log(2), 0.0]]))
    # Width/height deltas are clamped at log(1000 / 16): at most 62.5x the reference.
    big = coder.decode(torch.tensor([[0.0, 0.0, 5 * 10.0, 0.0]]), [r])[0, 0]
    torch.testing.assert_close(big[2] - big[0], torch.tensor(10 * 62.5))


def test_matcher_thresholds_ties_and_low_quality():
    # 2 ground truths x 5 predictions.
    q = torch.tensor([[0.9, 0.5, 0.2, 0.35, 0.1],
                      [0.1, 0.6, 0.2, 0.35, 0.25]])
    m = Matcher(0.7, 0.3)(q)
    # 0: 0.9 -> gt 0; 1: best 0.6 (between) -> -2; 2: best 0.2 -> -1; 3: tie 0.35 -> first (gt 0) but between -> -2;
    # 4: 0.25 -> -1.
    assert m.tolist() == [0, -2, -1, -2, -1]
    low = Matcher(0.7, 0.3, allow_low_quality_matches=True)(q)
    # gt 1's best is 0.6 at prediction 1: prediction 1 keeps its best match (gt 1). gt 0's best (0.9) is already matched.
    assert low.tolist() == [0, 1, -1, -2, -1]
    # Ties for a ground truth's best: every tied prediction is kept.
    q2 = torch.tensor([[0.2, 0.2, 0.1]])
    assert Matcher(0.7, 0.3, True)(q2).tolist() == [0, 0, -1]
    with pytest.raises(ValueError, match="empty"):
        Matcher(0.7, 0.3)(torch.zeros(0, 4))


@pytest.mark.parametrize("num_pos,num_neg,want_pos,want_neg", [(100, 1000, 64, 192), (10, 1000, 10, 246),
                                                               (300, 20, 64, 20), (0, 5, 0, 5)])
def test_sampler_ratios(seed, num_pos, num_neg, want_pos, want_neg):
    labels = torch.cat([torch.randint(1, 4, (num_pos,)), torch.zeros(num_neg, dtype=torch.long),
                        -torch.ones(30, dtype=torch.long)])
    labels = labels[torch.randperm(len(labels))]
    pos, neg = BalancedSampler(256, 0.25)([labels])
    assert int(pos[0].sum()) == want_pos and int(neg[0].sum()) == want_neg
    assert (labels[pos[0].bool()] >= 1).all() and (labels[neg[0].bool()] == 0).all()


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[25 / 175, 1.0, 0.0]]))


def test_training_with_and_without_annotations_and_eval_without_detections(seed):
    model = tiny_model()
    images = [torch.rand(3, 100, 120), torch.rand(3, 90, 70)]
    masks = torch.zeros(2, 100, 120, dtype=torch.uint8)
    masks[0, 10:50, 20:60] = 1
    masks[1, 60:90, 70:110] = 1
    targets = [{"boxes": torch.tensor([[20.0, 10, 60, 50], [70, 60, 110, 90]]), "labels": torch.tensor([1, 3]),
                "masks": masks},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                "masks": torch.zeros(0, 90, 70, dtype=torch.uint8)}]
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # Only empty images: still finite losses and gradients.
    model.zero_grad()
    losses = model(images[1:], targets[1:])
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
        assert [tuple(o["masks"].shape[-2:]) for o in out] == [(100, 120), (90, 70)]
        for o in out:
            assert o["masks"].shape[1] == 1 and len(o["boxes"]) == len(o["scores"]) == len(o["labels"]) == len(o["masks"])
            assert (o["boxes"][:, 2] <= 120).all() and ((o["masks"] >= 0) & (o["masks"] <= 1)).all()
        model.roi_heads.score_thresh = 1.0  # nothing passes
        out = model(images)
    assert [o["masks"].shape for o in out] == [(0, 1, 100, 120), (0, 1, 90, 70)]


def test_bad_targets_raise():
    model = tiny_model().train()
    img = [torch.rand(3, 64, 64)]
    with pytest.raises(ValueError, match="positive width"):
        model(img, [{"boxes": torch.tensor([[10.0, 10, 5, 20]]), "labels": torch.tensor([1]),
                     "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}])
    with pytest.raises(ValueError, match="targets are required"):
        model(img)
    with pytest.raises(TypeError, match="labels must be int64"):
        model(img, [{"boxes": torch.tensor([[1.0, 1, 5, 20]]), "labels": torch.tensor([1.0]),
                     "masks": torch.zeros(1, 64, 64, dtype=torch.uint8)}])


def test_load_torchvision_weights_from_a_file_and_mismatches(tmp_path):
    src, dst = tiny_model(), tiny_model()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, path)
    load_torchvision_weights(dst, str(path))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    sd = src.state_dict()
    sd.pop("roi_heads.box_predictor.cls_score.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="1 missing keys.*1 unexpected keys"):
        load_torchvision_weights(dst, sd)


def test_compile_backbone_and_heads_fullgraph(seed):
    torch._dynamo.reset()
    model = tiny_model().eval()
    x = torch.rand(1, 3, 96, 128)
    with torch.no_grad():
        want = model.backbone(x)
        got = torch.compile(model.backbone, fullgraph=True, backend="aot_eager")(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
        feats = {k: v for k, v in want.items() if k != "pool"}
        boxes = [torch.tensor([[5.0, 5, 60, 40], [10, 20, 90, 95]])]

        def heads(f, b):
            rh = model.roi_heads
            pooled = rh.box_roi_pool(f, b, [(96, 128)])
            logits, deltas = rh.box_predictor(rh.box_head(pooled))
            masks = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(f, b, [(96, 128)])))
            return logits, deltas, masks

        for a, b in zip(torch.compile(heads, fullgraph=True, backend="aot_eager")(feats, boxes), heads(feats, boxes)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
