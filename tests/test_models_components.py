"""instseg_ops.models (Mask R-CNN pieces) on small hand-computed cases, plus model-level
behaviour of a tiny ResNet-18-FPN configuration: training with and without annotations,
evaluation without detections, images of different sizes, autocast, weight loading and
torch.compile. torchvision is only needed by the two tests that load its state dict."""
import math

import pytest
import torch

import instseg_ops
from instseg_ops.models import MaskRCNN, load_torchvision_weights, maskrcnn_resnet50_fpn, maskrcnn_resnet_fpn
from instseg_ops.models.detection.anchors import AnchorGenerator
from instseg_ops.models.backbones import FrozenBatchNorm2d, GroupNorm32, resnet_fpn_backbone
from instseg_ops.models.backbones.norms import _GroupNormChannelsLast
from instseg_ops.models.detection.boxes import BoxCoder, box_iou
from instseg_ops.models.detection.matcher import BalancedSampler, Matcher
from instseg_ops.models.detection.poolers import mask_targets
from instseg_ops.models.detection.transform import DetectionTransform

LOSS_KEYS = {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}


def tiny_model(**kw):
    args = dict(depth=18, num_classes=5, norm="gn", trainable_layers=5, width=8, fpn_channels=16,
                representation_size=32, mask_layers=(16, 16), mask_hidden=16, min_size=96, max_size=128,
                rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=100,
                anchor_sizes=((16,), (32,), (64,), (128,), (256,)))
    args.update(kw)
    return maskrcnn_resnet_fpn(**args)


def box_targets(sizes, counts, gen):
    """Random boxes (at least 10 px wide and high) with rectangular masks and labels 1..4."""
    targets = []
    for (h, w), k in zip(sizes, counts):
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.5, h * 0.5])
        wh = torch.rand(k, 2, generator=gen) * torch.tensor([w * 0.4, h * 0.4]) + 10
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 5, (k,), generator=gen), "masks": masks})
    return targets


# ---------------------------------------------------------------- anchors, boxes, matching

def test_anchor_grid_by_hand():
    gen = AnchorGenerator(((32,), (64,)), ((1.0, 0.5), (2.0,)))
    # Image tensor 32 x 64. Level 0: 2 x 4 map (stride 16); level 1: 1 x 2 map (stride 32).
    feats = [torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 1, 2)]
    (anchors,) = gen((32, 64), 1, feats)
    # Size 32, ratio 1: half sizes 16. Ratio 0.5 (h / w): h = 32 * sqrt(0.5) = 22.6, w = 45.25,
    # halves 11.3 and 22.6 round to 11 and 23.
    base0 = torch.tensor([[-16.0, -16, 16, 16], [-23, -11, 23, 11]])
    # Size 64, ratio 2: h = 90.5, w = 45.25; halves 45.25 -> 45 and 22.6 -> 23.
    base1 = torch.tensor([[-23.0, -45, 23, 45]])
    want = [base0 + torch.tensor([x * 16.0, y * 16, x * 16, y * 16]) for y in range(2) for x in range(4)]
    want += [base1 + torch.tensor([x * 32.0, 0, x * 32, 0]) for x in range(2)]
    assert torch.equal(anchors, torch.cat(want))
    assert gen.num_anchors_per_location() == [2, 1]
    # One (identical) anchor tensor per image.
    a, b = gen((32, 64), 2, feats)
    assert torch.equal(a, b)


def test_box_coder_round_trip(seed):
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    refs = torch.rand(200, 2) * 500
    refs = torch.cat([refs, refs + torch.rand(200, 2) * 200 + 5], 1).double()
    boxes = torch.rand(200, 2) * 500
    boxes = torch.cat([boxes, boxes + torch.rand(200, 2) * 300 + 5], 1).double()  # < 62.5x the refs
    deltas = coder.encode([boxes], [refs])[0]
    back = coder.decode(deltas, [refs])[:, 0]
    torch.testing.assert_close(back, boxes, rtol=1e-9, atol=1e-9)
    # float32, several images: the per-image split is kept.
    d32 = coder.encode([boxes[:50].float(), boxes[50:].float()], [refs[:50].float(), refs[50:].float()])
    assert [len(d) for d in d32] == [50, 150]
    torch.testing.assert_close(coder.decode(torch.cat(d32), [refs[:50].float(), refs[50:].float()])[:, 0],
                               boxes.float(), rtol=1e-4, atol=1e-3)
    # Hand cases: a box encodes to zeros against itself; twice as wide at the same centre gives dw = 5 log 2.
    r = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    assert torch.equal(coder.encode([r], [r])[0], torch.zeros(1, 4))
    d = coder.encode([torch.tensor([[-5.0, 0.0, 15.0, 20.0]])], [r])[0]
    torch.testing.assert_close(d, torch.tensor([[0.0, 0.0, 5 * math.log(2), 0.0]]))
    # dx = 10 * (shift / width): a shift of 2 px in a 10 px wide box is 2.
    d = coder.encode([torch.tensor([[2.0, 0.0, 12.0, 20.0]])], [r])[0]
    torch.testing.assert_close(d, torch.tensor([[2.0, 0.0, 0.0, 0.0]]))
    # Width/height deltas are clamped at log(1000 / 16): at most 62.5x the reference.
    big = coder.decode(torch.tensor([[0.0, 0.0, 5 * 10.0, 0.0]]), [r])[0, 0]
    torch.testing.assert_close(big[2] - big[0], torch.tensor(10 * 62.5))


def test_box_iou_by_hand():
    a = torch.tensor([[0.0, 0, 10, 10]])
    b = torch.tensor([[5.0, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]])
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[25 / 175, 1.0, 0.0]]))


def test_matcher_thresholds_ties_and_low_quality():
    # 2 ground truths x 5 predictions.
    q = torch.tensor([[0.9, 0.5, 0.2, 0.35, 0.1],
                      [0.1, 0.6, 0.2, 0.35, 0.25]])
    # 0: 0.9 -> gt 0; 1: best 0.6 in [0.3, 0.7) -> -2; 2: 0.2 -> -1; 3: 0.35 (tie) -> -2; 4: 0.25 -> -1.
    assert Matcher(0.7, 0.3)(q).tolist() == [0, -2, -1, -2, -1]
    # gt 1's best IoU (0.6) is at prediction 1, which gets gt 1 back; gt 0's best is already matched.
    assert Matcher(0.7, 0.3, allow_low_quality_matches=True)(q).tolist() == [0, 1, -1, -2, -1]
    # Every prediction tied for a ground truth's best IoU is kept.
    assert Matcher(0.7, 0.3, True)(torch.tensor([[0.2, 0.2, 0.1]])).tolist() == [0, 0, -1]
    # A prediction tied between two ground truths takes the first of them.
    assert Matcher(0.5, 0.5)(torch.tensor([[0.8, 0.1], [0.8, 0.9]])).tolist() == [0, 1]
    # The high threshold is inclusive, the low one exclusive below: IoU == 0.5 with (0.5, 0.5) is foreground.
    assert Matcher(0.5, 0.5)(torch.tensor([[0.5, 0.4999]])).tolist() == [0, -1]
    with pytest.raises(ValueError, match="empty"):
        Matcher(0.7, 0.3)(torch.zeros(0, 4))
    with pytest.raises(ValueError, match="low threshold"):
        Matcher(0.3, 0.7)


@pytest.mark.parametrize("num_pos,num_neg,want_pos,want_neg", [(100, 1000, 64, 192), (10, 1000, 10, 246),
                                                               (300, 20, 64, 20), (0, 5, 0, 5)])
def test_sampler_ratios(seed, num_pos, num_neg, want_pos, want_neg):
    labels = torch.cat([torch.randint(1, 4, (num_pos,)), torch.zeros(num_neg, dtype=torch.long),
                        -torch.ones(30, dtype=torch.long)])
    labels = labels[torch.randperm(len(labels))]
    pos, neg = BalancedSampler(256, 0.25)([labels])
    assert int(pos[0].sum()) == want_pos and int(neg[0].sum()) == want_neg
    assert (labels[pos[0].bool()] >= 1).all() and (labels[neg[0].bool()] == 0).all()


def test_sampler_draws_like_torchvision(seed):
    """Per image: randperm over the positives, then over the negatives (torchvision's order of
    RNG calls), so that a shared seed gives both implementations the same samples."""
    labels = [torch.randint(-1, 3, (500,)), torch.randint(-1, 2, (300,))]
    state = torch.get_rng_state()
    pos, neg = BalancedSampler(64, 0.5)(labels)
    torch.set_rng_state(state)
    for lab, p, n in zip(labels, pos, neg):
        ip, ineg = torch.where(lab >= 1)[0], torch.where(lab == 0)[0]
        k = min(ip.numel(), 32)
        want_p = ip[torch.randperm(ip.numel())[:k]]
        want_n = ineg[torch.randperm(ineg.numel())[:min(ineg.numel(), 64 - k)]]
        assert torch.equal(torch.where(p)[0], want_p.sort().values)
        assert torch.equal(torch.where(n)[0], want_n.sort().values)


def test_mask_targets_through_roi_align():
    """Ground-truth masks resampled into the proposals with instseg_ops.roi_align (28 x 28,
    spatial scale 1, adaptive sampling, not aligned), proposal i reading mask matched[i]."""
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    masks[0, 8:40, 8:40] = 1
    masks[1, :, 32:] = 1
    props = torch.tensor([[12.0, 12, 36, 36], [40, 40, 60, 60], [0, 0, 64, 64]])
    t = mask_targets([masks], [props], [torch.tensor([0, 0, 1])], 28)
    assert t.shape == (3, 28, 28)
    assert torch.equal(t[0], torch.ones(28, 28))  # inside mask 0
    assert torch.equal(t[1], torch.zeros(28, 28))  # outside mask 0
    rois = torch.tensor([[1.0, 0, 0, 64, 64]])
    torch.testing.assert_close(t[2], instseg_ops.roi_align(masks[:, None].float(), rois, (28, 28), 1.0)[0, 0])
    assert torch.equal(t[2][:, :13], torch.zeros(28, 13)) and torch.equal(t[2][:, 15:], torch.ones(28, 13))
    ta = mask_targets([masks], [props], [torch.tensor([0, 0, 1])], 28, aligned=True)
    torch.testing.assert_close(ta[2], instseg_ops.roi_align(masks[:, None].float(), rois, (28, 28), 1.0,
                                                            aligned=True)[0, 0])


def test_aligned_mask_targets_paste_back_to_the_ground_truth(seed):
    """With ``aligned`` geometry a mask target pasted back into its box (threshold 0.5) gives the
    ground-truth mask: random rectangles whose box is the mask's extent. Torchvision's geometry
    (targets not aligned, integer-box paste) loses this: its target is the object moved half a pixel."""
    exact_tv = 0
    for _ in range(20):
        h, w = 48, 64
        y0, x0 = torch.randint(0, h - 4, ()).item(), torch.randint(0, w - 4, ()).item()
        y1, x1 = torch.randint(y0 + 3, h + 1, ()).item(), torch.randint(x0 + 3, w + 1, ()).item()
        gt = torch.zeros(1, h, w, dtype=torch.uint8)
        gt[0, y0:y1, x0:x1] = 1
        box = torch.tensor([[x0, y0, x1, y1]], dtype=torch.float32)
        t = mask_targets([gt], [box], [torch.tensor([0])], 28, aligned=True)
        back = instseg_ops.paste_masks(t, box, (h, w), aligned=True, threshold=0.5)
        assert torch.equal(back, gt.bool()), (x0, y0, x1, y1)
        t_tv = mask_targets([gt], [box], [torch.tensor([0])], 28)
        exact_tv += int(torch.equal(instseg_ops.paste_masks(t_tv, box, (h, w), threshold=0.5), gt.bool()))
    assert exact_tv < 20


def test_aligned_option_reaches_pools_targets_and_paste():
    for aligned in (False, True):
        m = maskrcnn_resnet_fpn(18, num_classes=3, norm="gn", width=8, fpn_channels=16, representation_size=32,
                                mask_layers=(16,), mask_hidden=16, aligned=aligned)
        assert m.roi_heads.box_roi_pool.aligned is aligned and m.roi_heads.mask_roi_pool.aligned is aligned
        assert m.roi_heads.aligned is aligned and m.transform.aligned is aligned


# ---------------------------------------------------------------- backbone, transform, defaults

def test_frozen_batchnorm_paths_and_checkpoint_counter(seed):
    bn = FrozenBatchNorm2d(6)
    for name in ("weight", "bias", "running_mean"):
        getattr(bn, name).normal_()
    bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 6, 5, 7)
    want = (x - bn.running_mean[:, None, None]) / (bn.running_var[:, None, None] + bn.eps).sqrt()
    want = want * bn.weight[:, None, None] + bn.bias[:, None, None]
    torch.testing.assert_close(bn(x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bn(x.bfloat16()).float(), want, rtol=2e-2, atol=5e-2)  # the autocast path
    sd = {k: v.clone() for k, v in bn.state_dict().items()}
    sd["num_batches_tracked"] = torch.tensor(7)  # as written by nn.BatchNorm2d
    FrozenBatchNorm2d(6).load_state_dict(sd, strict=True)
    assert not list(bn.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 32, 64, 48), (3, 48, 40, 33), (1, 6, 32, 32)])
def test_groupnorm_channels_last_backward_matches_torch(seed, dtype, shape):
    """GroupNorm32 on channels_last CPU input with gradients takes the custom backward; its
    output and all three gradients equal torch's GroupNorm's (random input, weight, bias and
    upstream gradient, every element compared)."""
    n, c, h, w = shape
    gen = torch.Generator().manual_seed(seed)
    x0 = (torch.randn(shape, generator=gen, dtype=dtype) * 3 + 1).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    ours = GroupNorm32(c).to(dtype)
    ref = torch.nn.GroupNorm(ours.num_groups, c).to(dtype)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(c, generator=gen, dtype=dtype))  # negative scales too
        ours.bias.copy_(torch.randn(c, generator=gen, dtype=dtype))
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    results = []
    for mod, dt in ((ours, dtype), (ref, dtype), (ref, torch.float64)):
        mod = mod.to(dt)
        x = x0.clone().to(dt).requires_grad_()
        y = mod(x)
        results.append((y, y.grad_fn.name()) + torch.autograd.grad(y, (x, mod.weight, mod.bias), dy.to(dt)))
    (y, name, *grads), (y_ref, _, *_), (_, _, *grads64) = results
    assert name == "_GroupNormChannelsLastBackward"
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert grads[0].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # the forward is torch's own
    # Against torch's float64 gradients; float32 sums of thousands of terms differ in the
    # last few bits from torch's own float32 result, so the tolerance scales with the values.
    for got, want in zip(grads, grads64):
        scale = want.abs().max().item()
        if dtype == torch.float32:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5 * scale)
        else:
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * scale)


def test_groupnorm_channels_last_gradcheck_and_path_choice(seed):
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: _GroupNormChannelsLast.apply(x, w, b, 2, 1e-5), (x, w, b))
    gn = GroupNorm32(64)
    big = torch.randn(1, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    assert gn(big).grad_fn.name() == "_GroupNormChannelsLastBackward"  # the weight needs a gradient
    assert gn(big.contiguous()).grad_fn.name() != "_GroupNormChannelsLastBackward"  # standard layout: torch's
    small = torch.randn(1, 64, 8, 8).contiguous(memory_format=torch.channels_last)
    assert gn(small).grad_fn.name() != "_GroupNormChannelsLastBackward"  # small maps: torch's
    with torch.no_grad():
        assert gn(big).grad_fn is None


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
@pytest.mark.parametrize("norm", ["frozen_bn", "bn", "gn"])
def test_backbone_depths_and_norms(depth, norm):
    bb = resnet_fpn_backbone(depth, norm, trainable_layers=3, out_channels=16, width=8).eval()
    with torch.no_grad():
        out = bb(torch.rand(1, 3, 64, 96))
    assert list(out) == ["0", "1", "2", "3", "pool"]
    assert [tuple(v.shape) for v in out.values()] == [(1, 16, 16, 24), (1, 16, 8, 12), (1, 16, 4, 6),
                                                      (1, 16, 2, 3), (1, 16, 1, 2)]
    expansion = 4 if depth >= 50 else 1
    assert bb.body.out_channels == [8 * expansion, 16 * expansion, 32 * expansion, 64 * expansion]
    assert len(bb.body.layer3) == {18: 2, 34: 6, 50: 6, 101: 23}[depth]
    trainable = {n.split(".")[0] for n, p in bb.body.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    with pytest.raises(ValueError, match="depth"):
        resnet_fpn_backbone(42)
    with pytest.raises(ValueError, match="norm"):
        resnet_fpn_backbone(18, "ln")


def test_transform_resize_normalise_batch_and_back():
    tr = DetectionTransform(800, 1333, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)).eval()
    images = [torch.full((3, 100, 150), 0.5), torch.full((3, 100, 400), 0.5)]
    batch, sizes, _ = tr(images)
    # Short side to 800 (100x150 -> 800x1200) unless the long side would pass 1333 (100x400 -> 333x1333).
    assert sizes == [(800, 1200), (333, 1333)]
    assert batch.shape == (2, 3, 800, 1344)  # padded to multiples of 32
    assert batch.is_contiguous(memory_format=torch.channels_last)  # the CPU default
    tr_nchw = DetectionTransform(800, 1333, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), channels_last=False).eval()
    batch_nchw = tr_nchw(images)[0]
    assert batch_nchw.is_contiguous() and torch.equal(batch_nchw, batch)
    torch.testing.assert_close(batch[0, :, 0, 0], (0.5 - torch.tensor([0.485, 0.456, 0.406])) /
                               torch.tensor([0.229, 0.224, 0.225]))
    assert batch[1, :, 333:].abs().sum() == 0 and batch[0, :, :, 1200:].abs().sum() == 0
    # Back: boxes rescaled to the original size, masks pasted into it.
    res = [{"boxes": torch.tensor([[80.0, 80, 400, 400]]), "masks": torch.ones(1, 1, 28, 28)}]
    (r,) = tr.postprocess(res, [(800, 1200)], [(100, 150)])
    torch.testing.assert_close(r["boxes"], torch.tensor([[10.0, 10, 50, 50]]))
    assert r["masks"].shape == (1, 1, 100, 150)
    torch.testing.assert_close(r["masks"][0], instseg_ops.paste_masks(torch.ones(1, 28, 28), r["boxes"],
                                                                      (100, 150), padding=1))


def test_maskrcnn_resnet50_fpn_defaults_and_overrides():
    m = maskrcnn_resnet50_fpn()
    assert isinstance(m, MaskRCNN)
    rpn, rh, tr = m.rpn, m.roi_heads, m.transform
    bs = rh.box_stage
    assert rpn.anchor_generator.sizes == [(32,), (64,), (128,), (256,), (512,)]
    assert rpn.anchor_generator.aspect_ratios == [(0.5, 1.0, 2.0)] * 5
    assert rpn._pre_nms_top_n == {"training": 2000, "testing": 1000}
    assert rpn._post_nms_top_n == {"training": 2000, "testing": 1000}
    assert (rpn.nms_thresh, rpn.matcher.high, rpn.matcher.low) == (0.7, 0.7, 0.3)
    assert rpn.matcher.allow_low_quality_matches and not bs.matcher.allow_low_quality_matches
    assert (rpn.sampler.batch_size_per_image, rpn.sampler.positive_fraction) == (256, 0.5)
    assert (bs.matcher.high, bs.matcher.low) == (0.5, 0.5)
    assert (bs.sampler.batch_size_per_image, bs.sampler.positive_fraction) == (512, 0.25)
    assert bs.box_coder.weights == (10.0, 10.0, 5.0, 5.0)
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.05, 0.5, 100)
    assert isinstance(rh.box_roi_pool, instseg_ops.MultiScaleRoIAlign)
    assert isinstance(rh.mask_roi_pool, instseg_ops.MultiScaleRoIAlign)
    assert (tr.min_size, tr.max_size, tr.size_divisible) == ((800,), 1333, 32)
    assert tr.image_mean == [0.485, 0.456, 0.406] and tr.image_std == [0.229, 0.224, 0.225]
    assert rh.box_predictor.cls_score.out_features == 91 and rh.mask_predictor.mask_fcn_logits.out_channels == 91
    assert isinstance(m.backbone.body.bn1, FrozenBatchNorm2d)
    m = maskrcnn_resnet50_fpn(num_classes=3, min_size=(480, 512), max_size=600, box_score_thresh=0.3,
                              rpn_post_nms_top_n_test=300, box_detections_per_img=7)
    assert (m.transform.min_size, m.transform.max_size) == ((480, 512), 600)
    assert (m.roi_heads.score_thresh, m.roi_heads.detections_per_img) == (0.3, 7)
    assert m.rpn.eval().post_nms_top_n() == 300 and m.roi_heads.box_predictor.cls_score.out_features == 3
    with pytest.raises(TypeError):
        maskrcnn_resnet50_fpn(no_such_option=1)
    assert (m.roi_heads.box_roi_pool.rule, m.roi_heads.box_roi_pool.canonical_scale) == ("fpn", 224.0)


@pytest.mark.parametrize("rule,scale", [("fpn", 72.0), ("scale_adaptive", 224.0)])
def test_roi_level_options_reach_both_poolers(seed, rule, scale):
    model = tiny_model(roi_level_rule=rule, roi_canonical_scale=scale)
    for pool in (model.roi_heads.box_roi_pool, model.roi_heads.mask_roi_pool):
        assert (pool.rule, pool.canonical_scale) == (rule, scale)
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=gen), torch.rand(3, 80, 96, generator=gen)]
    losses = model.train()(images, box_targets([(96, 128), (80, 96)], [3, 2], gen))
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    out = model.eval()(images)
    assert len(out) == 2 and all(o["masks"].shape[-2:] == im.shape[-2:] for o, im in zip(out, images))


def test_mask_positives_per_image_caps_the_mask_heads_rois(seed):
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 128, generator=gen), torch.rand(3, 80, 96, generator=gen)]
    targets = box_targets([(96, 128), (80, 96)], [3, 2], gen)
    counts = {}
    for cap in (0, 1):
        torch.manual_seed(seed)
        model = tiny_model(mask_positives_per_image=cap)
        seen = []
        model.roi_heads.mask_head.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[0]))
        losses = model.train()(images, targets)
        assert torch.isfinite(losses["loss_mask"]) and losses["loss_mask"] > 0
        counts[cap] = seen[0]
    # Every ground-truth box is also a proposal, so without the cap the mask head sees at least
    # the 5 of them; with a cap of 1 it sees one RoI per image.
    assert counts[0] >= 5 and counts[1] == 2
    with pytest.raises(ValueError, match="mask_positives_per_image"):
        tiny_model(mask_positives_per_image=-1)


# ---------------------------------------------------------------- the model

def test_training_with_and_without_annotations_and_eval_without_detections(seed):
    model = tiny_model()
    images = [torch.rand(3, 100, 120), torch.rand(3, 90, 70)]  # different sizes in one batch
    targets = box_targets([(100, 120)], [2], torch.Generator().manual_seed(seed))
    targets.append({"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long),
                    "masks": torch.zeros(0, 90, 70, dtype=torch.uint8)})
    model.train()
    losses = model(images, targets)
    assert set(losses) == LOSS_KEYS
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.body.conv1.weight.grad is not None
    # Only images without annotations: finite losses (box regression and mask losses 0), gradients flow.
    model.zero_grad()
    losses = model(images[1:], targets[1:])
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"] == 0 and losses["loss_mask"] == 0 and losses["loss_rpn_box_reg"] == 0
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
        assert [tuple(o["masks"].shape[-2:]) for o in out] == [(100, 120), (90, 70)]
        for o, (h, w) in zip(out, [(100, 120), (90, 70)]):
            assert set(o) == {"boxes", "labels", "scores", "masks"}
            assert o["masks"].shape[1] == 1 and len(o["boxes"]) == len(o["scores"]) == len(o["labels"]) == len(o["masks"])
            assert o["labels"].dtype == torch.int64 and o["masks"].dtype == torch.float32
            assert (o["boxes"][:, 2] <= w).all() and (o["boxes"][:, 3] <= h).all()
            assert ((o["masks"] >= 0) & (o["masks"] <= 1)).all()
            assert (o["scores"][:-1] >= o["scores"][1:]).all()
        model.roi_heads.score_thresh = 1.0  # nothing passes
        out = model(images)
    assert [o["masks"].shape for o in out] == [(0, 1, 100, 120), (0, 1, 90, 70)]
    assert [o["boxes"].shape for o in out] == [(0, 4), (0, 4)]


def test_training_step_reduces_the_loss_of_a_trainable_bn_model(seed):
    model = tiny_model(norm="bn").train()
    gen = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 96, 96, generator=gen)]
    targets = box_targets([(96, 96)], [2], gen)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    totals = []
    for _ in range(6):
        torch.manual_seed(0)  # the same samples every step
        loss = sum(model(images, targets).values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        totals.append(loss.item())
    assert totals[-1] < totals[0], totals


def test_autocast_cpu_bfloat16_eval_and_training(seed):
    model = tiny_model(norm="frozen_bn").eval()
    images = [torch.rand(3, 100, 120), torch.rand(3, 80, 96)]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    for o, (h, w) in zip(out, [(100, 120), (80, 96)]):
        assert o["masks"].shape[1:] == (1, h, w) and len(o["boxes"]) == len(o["masks"])
        assert torch.isfinite(o["boxes"]).all() and torch.isfinite(o["masks"].float()).all()
    model.train()
    targets = box_targets([(100, 120), (80, 96)], [2, 1], torch.Generator().manual_seed(seed))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(images, targets)
    assert set(losses) == LOSS_KEYS and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


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


# ---------------------------------------------------------------- weights

def test_load_torchvision_weights_from_a_file_and_mismatches(tmp_path, seed):
    src, dst = tiny_model(), tiny_model()
    path = tmp_path / "ckpt.pth"
    torch.save({"model": src.state_dict()}, path)  # wrapped, as training scripts save it
    load_torchvision_weights(dst, str(path))
    for (k, a), b in zip(src.state_dict().items(), dst.state_dict().values()):
        assert torch.equal(a, b), k
    torch.save(src.state_dict(), path)  # bare
    load_torchvision_weights(tiny_model(), path)
    sd = src.state_dict()
    sd.pop("roi_heads.box_predictor.cls_score.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="1 missing keys.*1 unexpected keys"):
        load_torchvision_weights(dst, sd)
    # A checkpoint for another number of classes: the shapes differ.
    with pytest.raises(RuntimeError, match="size mismatch for roi_heads.box_predictor.cls_score.weight"):
        load_torchvision_weights(tiny_model(num_classes=3), src.state_dict())


def test_torchvision_state_dict_loads_strict_and_from_a_path(tmp_path):
    tvd = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    tv_sd = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None).state_dict()
    ours = maskrcnn_resnet50_fpn()
    want = {k: v.shape for k, v in tv_sd.items() if not k.endswith("num_batches_tracked")}
    assert want == {k: v.shape for k, v in ours.state_dict().items()}
    for key in ("backbone.body.layer1.0.conv1.weight", "backbone.body.bn1.running_var",
                "backbone.fpn.inner_blocks.0.0.weight", "backbone.fpn.layer_blocks.3.0.bias",
                "rpn.head.conv.0.0.weight", "roi_heads.box_head.fc6.weight",
                "roi_heads.mask_head.0.0.weight", "roi_heads.mask_predictor.conv5_mask.weight"):
        assert key in want, key
    ours.load_state_dict(tv_sd, strict=True)
    path = tmp_path / "tv_maskrcnn.pth"
    torch.save(tv_sd, path)
    ours = load_torchvision_weights(maskrcnn_resnet50_fpn(), str(path))
    for k, v in ours.state_dict().items():
        assert torch.equal(v, tv_sd[k]), k


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_compile_backbone_fpn_and_heads_fullgraph(seed, memory_format):
    torch._dynamo.reset()
    model = tiny_model().eval()  # GroupNorm: its fake kernel's layout differs from the CPU kernel's
    x = torch.rand(1, 3, 96, 128).contiguous(memory_format=memory_format)
    with torch.no_grad():
        want = model.backbone(x)
        got = torch.compile(model.backbone, fullgraph=True, backend="aot_eager")(x)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-5)
        feats = {k: v for k, v in want.items() if k != "pool"}
        boxes = [torch.tensor([[5.0, 5, 60, 40], [10, 20, 90, 95]])]

        def heads(f, b):
            rh = model.roi_heads
            logits, deltas = rh.box_predictor(rh.box_head(rh.box_roi_pool(f, b, [(96, 128)])))
            masks = rh.mask_predictor(rh.mask_head(rh.mask_roi_pool(f, b, [(96, 128)])))
            return logits, deltas, masks

        for a, b in zip(torch.compile(heads, fullgraph=True, backend="aot_eager")(feats, boxes), heads(feats, boxes)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_compile_whole_eval_model_with_dynamic_output_shapes(seed):
    """Without capture_dynamic_output_shape_ops, the score / size filters (torch.where) and
    NMS (data-dependent output length) break the graph; with it the whole inference traces."""
    torch._dynamo.reset()
    model = tiny_model().eval()
    images = [torch.rand(3, 100, 120), torch.rand(3, 90, 70)]
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        want = model(images)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(images)
    for w, g in zip(want, got):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=1e-5, atol=1e-5)
