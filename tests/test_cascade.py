"""Cascade Mask R-CNN (instseg_ops.models.cascade_rcnn): stage relabelling against a brute-force
matcher, the 1/3 gradient scale, test-time score averaging against a hand computation, the
per-stage box coders, the mmdetection variant's options, empty and all-negative targets,
training, torch.compile, torchvision-layout weights, the registered models and preset, and the
stage-IoU measurement."""
import math

import pytest
import torch

from instseg_ops.models import CascadeMaskRCNN, CascadeRoIHeads, get_model, list_models, load_pretrained
from instseg_ops.models.cascade_rcnn import STAGE_BBOX_REG_WEIGHTS, scale_gradient
from instseg_ops.models.cascade_rcnn.stage_iou import best_ious_per_stage, summarize

SIZE = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(**kw):
    return get_model("cascade_maskrcnn_tiny_shapes", **kw)


def random_targets(n, gen, size=SIZE, lo=1, hi=4):
    targets = []
    for _ in range(n):
        k = int(torch.randint(lo, hi, (), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * (size - 24)
        wh = 10 + torch.rand(k, 2, generator=gen) * 12
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, size, size, dtype=torch.uint8)
        for i, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[i, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes, "labels": torch.randint(1, 7, (k,), generator=gen), "masks": masks})
    return targets


def empty_target(size=SIZE):
    return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
            "masks": torch.zeros(0, size, size, dtype=torch.uint8)}


def jittered(targets, gen, n=40, spread=0.35):
    """Proposals around each image's ground truth (IoUs spread over 0-1) plus random boxes."""
    out = []
    for t in targets:
        g = t["boxes"]
        if g.numel():
            src = g[torch.randint(0, len(g), (n,), generator=gen)]
            wh = (src[:, 2:] - src[:, :2]).repeat(1, 2)
            src = src + (torch.rand(n, 4, generator=gen) - 0.5) * 2 * spread * wh
        else:
            src = torch.zeros(0, 4)
        xy = torch.rand(n // 2, 2, generator=gen) * (SIZE - 20)
        rnd = torch.cat([xy, xy + 6 + torch.rand(n // 2, 2, generator=gen) * 14], 1)
        boxes = torch.cat([src, rnd])
        boxes[:, 2:] = torch.max(boxes[:, 2:], boxes[:, :2] + 2)
        out.append(boxes.clamp(0, SIZE))
    return out


def features_of(model, n=2):
    batch = torch.rand(n, 3, SIZE, SIZE)
    return {k: v for k, v in model.backbone(batch).items()}, [(SIZE, SIZE)] * n


def loud_predictors(rh, gen, std=1.0):
    """Random predictors that move boxes by a few percent to tens of percent of their size (the
    stage weights divide the deltas), varied from RoI to RoI."""
    with torch.no_grad():
        for p in rh.box_predictor:
            p.bbox_pred.weight.copy_(torch.randn(p.bbox_pred.weight.shape, generator=gen) * std)
            p.bbox_pred.bias.copy_(torch.randn(4, generator=gen) * 0.3)
            p.cls_score.weight.copy_(torch.randn(p.cls_score.weight.shape, generator=gen))


def decode_by_hand(deltas, boxes, weights, clip=math.log(1000.0 / 16)):
    """R-CNN box decoding written out per box with Python floats."""
    out = []
    for d, b in zip(deltas.tolist(), boxes.tolist()):
        wx, wy, ww, wh = weights
        w, h = b[2] - b[0], b[3] - b[1]
        cx, cy = b[0] + 0.5 * w, b[1] + 0.5 * h
        dx, dy, dw, dh = d[0] / wx, d[1] / wy, min(d[2] / ww, clip), min(d[3] / wh, clip)
        pcx, pcy, pw, ph = dx * w + cx, dy * h + cy, math.exp(dw) * w, math.exp(dh) * h
        out.append([pcx - pw / 2, pcy - ph / 2, pcx + pw / 2, pcy + ph / 2])
    return torch.tensor(out, dtype=torch.float64).reshape(-1, 4)


def iou_by_hand(a, b):
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


# ---------------------------------------------------------------------------------- the stages

def test_stages_are_three_box_stage_objects_with_the_references_rules():
    m = tiny()
    rh = m.roi_heads
    assert isinstance(m, CascadeMaskRCNN) and isinstance(rh, CascadeRoIHeads) and rh.num_stages == 3
    for k, (stage, iou, w) in enumerate(zip(rh.stages, (0.5, 0.6, 0.7), STAGE_BBOX_REG_WEIGHTS)):
        assert stage.matcher.high == stage.matcher.low == iou and not stage.matcher.allow_low_quality_matches
        assert stage.box_coder.weights == w and stage.class_agnostic
        assert stage.head is rh.box_head[k] and stage.predictor is rh.box_predictor[k]
        assert stage.predictor.bbox_pred.out_features == 4
    assert STAGE_BBOX_REG_WEIGHTS == ((10, 10, 5, 5), (20, 20, 10, 10), (30, 30, 15, 15))
    # One shared box pooler, one mask head (detectron2's variant).
    assert len({id(s.pooler.pooler) for s in rh.stages}) == 1 and not isinstance(rh.mask_head, torch.nn.ModuleList)
    assert rh.stage_loss_weights == (1.0, 1.0, 1.0) and rh.score_average == "probs"
    with pytest.raises(ValueError, match="single box stage"):
        get_model("cascade_maskrcnn_tiny_shapes", bbox_reg_weights=(1.0, 1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="unknown cascade variant"):
        get_model("cascade_maskrcnn_tiny_shapes", variant="nope")


def test_later_stages_relabel_the_refined_boxes_of_the_same_rois(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny(box_batch_size_per_image=512).train()  # every proposal sampled: the ground truth is in
    rh = model.roi_heads
    loud_predictors(rh, gen)
    feats, sizes = features_of(model)
    targets = random_targets(2, gen)
    targets[1] = empty_target() if seed % 3 == 0 else targets[1]
    proposals = jittered(targets, gen)
    samples, losses = rh._forward_box(feats, proposals, sizes, targets)
    assert set(losses) == {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)}
    assert any(g.any() for g in samples[0].from_gt)  # stage 0 adds the ground truth
    saw = {"moved": 0, "fg": [0, 0, 0]}
    for k in (1, 2):
        prev, cur, stage = samples[k - 1], samples[k], rh.stages[k]
        with torch.no_grad():
            _, deltas = rh.stages[k - 1](feats, prev.boxes, sizes)
        counts = [len(b) for b in prev.boxes]
        for i, (d, b, t) in enumerate(zip(deltas.split(counts), prev.boxes, targets)):
            want = decode_by_hand(d.double(), b.double(), STAGE_BBOX_REG_WEIGHTS[k - 1])
            want[:, 0::2] = want[:, 0::2].clamp(0, SIZE)
            want[:, 1::2] = want[:, 1::2].clamp(0, SIZE)
            want = want[(want[:, 2] > want[:, 0]) & (want[:, 3] > want[:, 1])]
            # The same RoIs (no sampling, no ground truth added), refined by the previous stage.
            assert cur.boxes[i].shape == want.shape and not cur.from_gt[i].any()
            torch.testing.assert_close(cur.boxes[i].double(), want, rtol=1e-4, atol=1e-3)
            saw["moved"] += int((want.shape == b.shape) and not torch.allclose(want, b.double(), atol=0.5))
            # Brute force: best IoU over the ground truth, positive at or above the stage's IoU.
            for j, box in enumerate(cur.boxes[i].tolist()):
                ious = [iou_by_hand(box, g) for g in t["boxes"].tolist()]
                best = max(ious) if ious else 0.0
                if abs(best - stage.matcher.high) < 1e-4:
                    continue  # rounding at the threshold
                want_label = int(t["labels"][ious.index(best)]) if best >= stage.matcher.high else 0
                assert int(cur.labels[i][j]) == want_label, (k, i, j, best)
                if want_label:
                    assert ious[int(cur.matched[i][j])] == pytest.approx(best, abs=1e-5)
                    saw["fg"][k] += 1
    assert saw["moved"] > 0 and saw["fg"][1] + saw["fg"][2] > 0


def test_pooled_features_gradient_is_scaled_by_one_third(seed):
    x = torch.randn(5, 3, requires_grad=True)
    w = torch.randn(5, 3)
    y = scale_gradient(x, 1 / 3)
    assert torch.equal(y, x)
    (y * w).sum().backward()
    torch.testing.assert_close(x.grad, w * (1 / 3), rtol=1e-6, atol=0)
    # Model level: the same weights and samples with and without the scale; all of the box losses'
    # gradient on the features goes through the pooled features, so it is a third; the heads'
    # parameter gradients are unchanged.
    gen = torch.Generator().manual_seed(seed)
    scaled = tiny().train()
    plain = tiny(scale_gradient=False).train()
    plain.load_state_dict(scaled.state_dict())
    with torch.no_grad():
        base = scaled.backbone(torch.rand(2, 3, SIZE, SIZE))
    targets = random_targets(2, gen)
    proposals = jittered(targets, gen)
    grads, head_grads = [], []
    for m in (scaled, plain):
        feats = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        torch.manual_seed(seed)  # the same samples
        _, losses = m.roi_heads._forward_box(feats, proposals, [(SIZE, SIZE)] * 2, targets)
        m.zero_grad()
        sum(losses.values()).backward()
        grads.append(torch.cat([f.grad.flatten() for f in feats.values() if f.grad is not None]))
        head_grads.append(torch.cat([p.grad.flatten() for p in m.roi_heads.box_head.parameters()]))
    assert grads[1].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1] / 3, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(head_grads[0], head_grads[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("variant", ["detectron2", "mmdetection"])
def test_test_scores_average_the_stages_by_hand(seed, variant):
    gen = torch.Generator().manual_seed(seed)
    model = tiny(variant=variant, box_score_thresh=0.0, box_nms_thresh=1.0, box_detections_per_img=10 ** 6).eval()
    rh = model.roi_heads
    loud_predictors(rh, gen)
    feats, sizes = features_of(model, 1)
    proposals = jittered(random_targets(1, gen), gen, n=10)
    with torch.no_grad():
        (dets,), _ = rh._forward_box(feats, proposals, sizes, None)
        boxes, logits = proposals[0].double(), []
        for k in range(3):
            cls, deltas = rh.box_predictor[k](rh.box_head[k](rh.box_roi_pool(feats, [boxes.float()], sizes)))
            logits.append(cls.double())
            boxes = decode_by_hand(deltas.double(), boxes, STAGE_BBOX_REG_WEIGHTS[k]).clamp(0, SIZE)
    if variant == "detectron2":
        probs = sum(torch.softmax(x, -1) for x in logits) / 3
    else:
        probs = torch.softmax(sum(logits) / 3, -1)
    # Every (RoI, class >= 1) pair of a box of at least 0.01 px is a detection (no threshold, no
    # suppression), with the last stage's box for every class.
    keep = ((boxes[:, 2] - boxes[:, 0]) >= 1e-2) & ((boxes[:, 3] - boxes[:, 1]) >= 1e-2)
    want_scores = probs[keep, 1:].flatten()
    want = sorted(zip(want_scores.tolist(), boxes[keep].repeat_interleave(probs.shape[1] - 1, 0).tolist()))
    got = sorted(zip(dets["scores"].tolist(), dets["boxes"].tolist()))
    assert len(got) == len(want) > 0
    for (gs, gb), (ws, wb) in zip(got, want):
        assert gs == pytest.approx(ws, rel=1e-4, abs=1e-6)
    torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in want]).float(),
                               rtol=1e-4, atol=1e-6)
    # Boxes: match each detection to the hand box set.
    gb = torch.tensor([b for _, b in got])
    hb = boxes[keep].float()
    assert (torch.cdist(gb, hb).min(dim=1).values < 0.1).all()  # float32 through three stages


def test_default_test_settings():
    rh = get_model("cascade_maskrcnn_resnet50_fpn", num_classes=3).roi_heads
    assert (rh.score_thresh, rh.nms_thresh, rh.detections_per_img) == (0.05, 0.5, 100)


def test_per_stage_box_coder_round_trip(seed):
    gen = torch.Generator().manual_seed(seed)
    rh = tiny().roi_heads
    refs = torch.rand(50, 2, generator=gen) * 40
    refs = torch.cat([refs, refs + 2 + torch.rand(50, 2, generator=gen) * 20], 1)
    gt = refs + (torch.rand(50, 4, generator=gen) - 0.5) * 6
    gt[:, 2:] = torch.max(gt[:, 2:], gt[:, :2] + 1)
    enc = [stage.box_coder.encode_one(gt, refs) for stage in rh.stages]
    for stage, e in zip(rh.stages, enc):
        torch.testing.assert_close(stage.box_coder.decode_one(e, refs), gt, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(decode_by_hand(e.double(), refs.double(), stage.box_coder.weights).float(), gt,
                                   rtol=1e-5, atol=1e-4)
    # The weights scale the deltas: stage 1's are twice stage 0's, stage 2's three times.
    torch.testing.assert_close(enc[1], 2 * enc[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc[2], 3 * enc[0], rtol=1e-5, atol=1e-5)
    # A stage's regression targets are encoded with its own coder.
    targets = random_targets(1, gen)
    s, reg = rh.stages[2].label(jittered(targets, gen), targets)
    pos = s.labels[0] > 0
    if pos.any():
        back = rh.stages[2].box_coder.decode_one(reg[0][pos], s.boxes[0][pos])
        torch.testing.assert_close(back, targets[0]["boxes"][s.matched[0][pos]], rtol=1e-5, atol=1e-3)


# ---------------------------------------------------------------------------- mmdetection variant

def test_mmdetection_variant_options(seed):
    gen = torch.Generator().manual_seed(seed)
    m = tiny(variant="mmdetection").train()
    rh = m.roi_heads
    assert rh.stage_loss_weights == (1.0, 0.5, 0.25) and rh.resample and rh.score_average == "logits"
    assert not isinstance(rh.stages[0].pooler, type(tiny().roi_heads.stages[0].pooler))  # no gradient scale
    assert isinstance(rh.mask_head, torch.nn.ModuleList) and len(rh.mask_predictor) == 3
    loud_predictors(rh, gen)
    feats, sizes = features_of(m)
    targets = random_targets(2, gen)
    proposals = jittered(targets, gen)
    torch.manual_seed(seed)
    samples, losses = rh._forward_box(feats, proposals, sizes, targets)
    torch.manual_seed(seed)
    losses.update(rh._forward_mask(feats, samples, sizes, targets))
    assert set(losses) == {f"loss_{n}_stage{k}" for n in ("cls", "box_reg", "mask") for k in range(3)}
    bs = rh.stages[0].sampler.batch_size_per_image
    for k in (1, 2):
        for i, t in enumerate(targets):
            s = samples[k]
            # Re-sampled with the ground truth added; the previous stage's refined ground-truth
            # samples were dropped, its other refined samples are the candidates.
            assert len(s.boxes[i]) <= bs and s.from_gt[i].any()
            gt_rows = s.boxes[i][s.from_gt[i]]
            assert all((t["boxes"] == g).all(1).any() for g in gt_rows)
            with torch.no_grad():
                _, d = rh.stages[k - 1](feats, samples[k - 1].boxes, sizes)
            refined = rh.refine(rh.stages[k - 1], d, samples[k - 1].boxes, sizes)[i]
            candidates = refined[~samples[k - 1].from_gt[i]]
            for b in s.boxes[i][~s.from_gt[i]]:
                assert (candidates - b).abs().amax(1).min() < 1e-4
    # Stage loss weights: the same model and samples with weights 1 / 1 / 1.
    same = tiny(variant="mmdetection", stage_loss_weights=(1.0, 1.0, 1.0)).train()
    same.load_state_dict(m.state_dict())
    torch.manual_seed(seed)
    samples2, unweighted = same.roi_heads._forward_box(feats, proposals, sizes, targets)
    torch.manual_seed(seed)
    unweighted.update(same.roi_heads._forward_mask(feats, samples2, sizes, targets))
    for key, v in unweighted.items():
        w = (1.0, 0.5, 0.25)[int(key[-1])]
        torch.testing.assert_close(losses[key], v * w, rtol=1e-5, atol=1e-7)
    # Test time: the mean of the three mask heads' sigmoids for each detection's class.
    m.eval()
    dets = [{"boxes": torch.tensor([[2.0, 3.0, 30.0, 40.0], [10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([3, 5])}]
    with torch.no_grad():
        out = rh.forward_with_given_boxes(feats, dets, sizes[:1])[0]["masks"]
        want = sum(rh.mask_predictor[k](rh.mask_head[k](rh.mask_roi_pool(feats, [dets[0]["boxes"]], sizes[:1])))
                   [[0, 1], [3, 5]].sigmoid() for k in range(3)) / 3
    assert out.shape == (2, 1, 28, 28)
    torch.testing.assert_close(out[:, 0], want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------ training, edge cases

@pytest.mark.parametrize("variant", ["detectron2", "mmdetection"])
def test_training_steps_with_and_without_annotations(seed, variant):
    gen = torch.Generator().manual_seed(seed)
    model = tiny(variant=variant).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)]
    targets = random_targets(1, gen) + [empty_target()]
    mask_keys = {"loss_mask"} if variant == "detectron2" else {f"loss_mask_stage{k}" for k in range(3)}
    want = {f"loss_{n}_stage{k}" for n in ("cls", "box_reg") for k in range(3)} | mask_keys | {
        "loss_objectness", "loss_rpn_box_reg"}
    for _ in range(2):
        losses = model(images, targets)
        assert set(losses) == want and all(v.isfinite() for v in losses.values()), losses
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert all(p.grad is None or p.grad.isfinite().all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert set(out[0]) == {"boxes", "labels", "scores", "masks"}
    assert out[0]["masks"].shape[1:] == (1, SIZE, SIZE)


@pytest.mark.parametrize("variant", ["detectron2", "mmdetection"])
def test_all_negative_batch(seed, variant):
    """No image has an annotation: every sample at every stage is background, the box and mask
    losses are 0 and the backward pass runs."""
    model = tiny(variant=variant).train()
    losses = model([torch.rand(3, SIZE, SIZE), torch.rand(3, SIZE, SIZE)], [empty_target(), empty_target()])
    assert all(v.isfinite() for v in losses.values())
    for k, v in losses.items():
        if k.startswith(("loss_box_reg_stage", "loss_mask")):
            assert v == 0, k
        if k.startswith("loss_cls_stage"):
            assert v > 0, k
    sum(losses.values()).backward()
    # And proposals none of which reach a ground truth: stage labels are all background.
    rh = model.roi_heads
    feats, sizes = features_of(model, 1)
    far = [{"boxes": torch.tensor([[50.0, 50.0, 60.0, 60.0]]), "labels": torch.tensor([2]),
            "masks": torch.zeros(1, SIZE, SIZE, dtype=torch.uint8)}]
    s, _ = rh.stages[1].label([torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]])], far)
    assert (s.labels[0] == 0).all()
    s, _ = rh.stages[1].label([torch.zeros(0, 4)], far)  # no boxes left at a later stage
    assert s.labels[0].shape == (0,)


def test_evaluation_without_detections(seed):
    model = tiny(box_score_thresh=1.01).eval()
    with torch.no_grad():
        out = model([torch.rand(3, SIZE, SIZE), torch.rand(3, 48, 56)])
    assert [len(o["boxes"]) for o in out] == [0, 0] and out[1]["masks"].shape == (0, 1, 48, 56)


@pytest.mark.slow
def test_compile_whole_eval_model(seed):
    """As the Mask R-CNN test: the whole inference traces (fullgraph) with dynamic output shapes."""
    torch._dynamo.reset()
    model = tiny(box_score_thresh=0.0).eval()
    images = [torch.rand(3, SIZE, SIZE), torch.rand(3, 56, 48)]
    with torch.no_grad(), torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        want = model(images)
        got = torch.compile(model, fullgraph=True, backend="aot_eager")(images)
    # the traced graph's decompositions sum float32 in another order: at seed 2089110134, 3 of
    # 53760 mask probabilities differed by 1.2e-5
    for w, g in zip(want, got):
        for k in w:
            torch.testing.assert_close(g[k], w[k], rtol=1e-4, atol=5e-5)


# -------------------------------------------------------------------------- registry and weights

def test_registered_models_and_preset():
    from instseg_ops.models.engine.presets import PRESETS, build_model, get_preset
    assert {"cascade_maskrcnn_resnet50_fpn", "cascade_maskrcnn_resnet_fpn", "cascade_maskrcnn_r18_half_shapes",
            "cascade_maskrcnn_tiny_shapes"} <= set(list_models())
    mask, cascade = PRESETS["shapes_r18_fast_cpu"], get_preset("shapes_cascade_r18_fast_cpu")
    a, b = mask.to_dict(), cascade.to_dict()
    assert b.pop("arch") == "cascade_maskrcnn_r18_half_shapes" and b.pop("name") == "shapes_cascade_r18_fast_cpu"
    a.pop("arch"), a.pop("name")
    assert a == b and cascade.time_budget == 29.0
    # The same backbone, FPN and RPN as the Mask R-CNN preset's model.
    mm, cm = build_model(mask), build_model(cascade)
    assert isinstance(cm, CascadeMaskRCNN)
    shapes = lambda m: {k: v.shape for k, v in m.state_dict().items() if k.startswith(("backbone.", "rpn."))}  # noqa: E731
    assert shapes(mm) == shapes(cm)
    assert cm.roi_heads.stages[0].sampler.batch_size_per_image == mm.roi_heads.box_stage.sampler.batch_size_per_image


def test_load_pretrained_takes_a_torchvision_maskrcnn_backbone_and_rpn():
    tvd = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    tv_sd = tvd.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3).state_dict()
    model = get_model("cascade_maskrcnn_resnet50_fpn", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("roi_heads.")}
    with pytest.raises(RuntimeError, match="missing keys"):
        load_pretrained(model, tv_sd)
    report = load_pretrained(model, tv_sd, strict=False)
    assert report.layout == "torchvision_maskrcnn_backbone" and report.unexpected_keys == []
    assert set(report.missing_keys) == set(before)
    sd = model.state_dict()
    loaded = [k for k in sd if k.startswith(("backbone.", "rpn."))]
    assert len(loaded) > 250
    for k in loaded:
        assert torch.equal(sd[k], tv_sd[k]), k
    for k, v in before.items():
        assert torch.equal(sd[k], v), k  # the cascade's heads stay as built
    # The cascade's own checkpoints load with strict=True.
    again = get_model("cascade_maskrcnn_resnet50_fpn", num_classes=3)
    assert load_pretrained(again, sd).layout == "instseg_ops"


# ------------------------------------------------------------------------------ stage-IoU helper

def test_stage_iou_rows_by_hand(seed):
    gen = torch.Generator().manual_seed(seed)
    model = tiny().eval()
    loud_predictors(model.roi_heads, gen)
    images = [torch.rand(3, SIZE, SIZE)]
    targets = random_targets(1, gen)
    ious = best_ious_per_stage(model, images, targets)
    assert len(ious) == 4 and len({x.shape for x in ious}) == 1 and not model.training
    # The stage inputs by hand: the same proposals, refined by hand.
    with torch.no_grad():
        batch, sizes, _ = model.transform(images)
        feats = model.backbone(batch)
        props, _ = model.rpn(tuple(batch.shape[-2:]), sizes, feats)
        rh = model.roi_heads
        boxes = props[0].double()
        for k in range(4):
            want = torch.tensor([max(iou_by_hand(b, g) for g in targets[0]["boxes"].tolist()) for b in boxes.tolist()])
            torch.testing.assert_close(ious[k].double(), want.double(), rtol=1e-4, atol=1e-4)
            if k < 3:
                _, d = rh.box_predictor[k](rh.box_head[k](rh.box_roi_pool(feats, [boxes.float()], sizes)))
                boxes = decode_by_hand(d.double(), boxes, STAGE_BBOX_REG_WEIGHTS[k]).clamp(0, SIZE)
    fake = [torch.tensor([0.9, 0.55, 0.2, 0.6]), torch.tensor([0.95, 0.4, 0.75, 0.72]), torch.tensor([0.5, 0.8, 0.1, 1.0])]
    rows = summarize(fake)
    assert [r["stage"] for r in rows] == ["stage0_input", "stage1_input", "output"]
    assert rows[0]["foreground"] == 3 and rows[0]["mean_iou"] == pytest.approx((0.9 + 0.55 + 0.6) / 3)
    assert rows[1]["frac_above_0.7"] == pytest.approx(1.0) and rows[1]["foreground"] == 3
    assert rows[2]["tracked_mean_iou"] == pytest.approx((0.5 + 0.8 + 1.0) / 3)
    assert rows[2]["tracked_frac_above_0.7"] == pytest.approx(2 / 3)


def test_stage_iou_cli_on_a_trained_checkpoint(tmp_path):
    from instseg_ops.models.cascade_rcnn.__main__ import main
    from instseg_ops.models.data import generate_split
    from instseg_ops.models.engine import get_preset
    from instseg_ops.models.engine.hooks import default_hooks
    from instseg_ops.models.engine.trainer import Trainer
    data = tmp_path / "data"
    generate_split(str(data), "train", 3, SIZE, seed=1)
    generate_split(str(data), "val", 2, SIZE, seed=2)
    preset = get_preset("tiny_cpu", arch="cascade_maskrcnn_tiny_shapes", iters=2, warmup_iters=1, milestones=(),
                        log_period=1000)
    t = Trainer(preset, str(data), str(tmp_path / "run"), hooks=default_hooks(preset, 0), log=lambda *a, **k: None)
    t.train()
    rows = main(["--stage-iou", str(tmp_path / "run" / "model_final.pth"), "--data", str(data), "--device", "cpu",
                 "--json", str(tmp_path / "rows.json")])
    assert [r["stage"] for r in rows] == ["stage0_input", "stage1_input", "stage2_input", "output"]
    assert (tmp_path / "rows.json").exists()
