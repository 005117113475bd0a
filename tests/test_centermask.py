"""CenterMask / CenterMask-Lite: VoVNetV2 bodies, FCOS (targets, losses, inference), the
SAG-Mask and MaskIoU heads, the scale-adaptive level rule per image, and the whole model in
training and evaluation. References here are written independently (loops over locations,
boxes and pixels; torchvision's focal loss and NMS)."""
import math

import pytest
import torch
import torch.nn.functional as F

import instseg_ops
from instseg_ops.models import get_model, list_models, vovnet
from instseg_ops.models.backbones.vovnet import STAGE_SPECS, OSAModule
from instseg_ops.models.centermask import (
    CenterMaskHeads,
    MaskIoUHead,
    SAGMaskHead,
    SpatialAttention,
    box_mask_fraction,
    maskiou_loss,
    maskiou_targets,
)
from instseg_ops.models.detection.fcos import (
    FCOSHead,
    centerness_targets,
    fcos_inference,
    fcos_losses,
    fcos_targets,
    giou_loss,
    level_locations,
    sigmoid_focal_loss,
)

# ------------------------------------------------------------------------------------ VoVNet

# Backbone parameters without a classifier (trainable BatchNorm counted), models.md section 1.2.
SPEC_PARAMS_M = {"V-19-slim-dw": 1.38, "V-19-slim": 2.65, "V-19": 10.18, "V-39": 25.18, "V-57": 41.45, "V-99": 69.52}


@pytest.mark.parametrize("name", sorted(STAGE_SPECS))
def test_vovnet_parameter_counts_and_outputs(name):
    body = vovnet(name, norm="bn", out_features=("stage2", "stage3", "stage4", "stage5"))
    n = sum(p.numel() for p in body.parameters())
    if name in SPEC_PARAMS_M:
        assert round(n / 1e6, 2) == SPEC_PARAMS_M[name]
    # frozen BN keeps the same convolutions and no trainable norm parameters; GN the same count as BN
    frozen = vovnet(name + "-eSE", norm="frozen_bn")
    bn_params = sum(m.weight.numel() * 2 for m in body.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert sum(p.numel() for p in frozen.parameters()) == n - bn_params
    assert sum(p.numel() for p in vovnet(name, norm="gn").parameters()) == n
    spec = STAGE_SPECS[name]
    out = body.eval()(torch.randn(1, 3, 70, 90))
    assert list(out) == ["stage2", "stage3", "stage4", "stage5"] and body.strides == [4, 8, 16, 32]
    conv = lambda n: (n - 1) // 2 + 1  # noqa: E731  3x3, stride 2, padding 1
    pool = lambda n: math.ceil((n - 3) / 2) + 1  # noqa: E731  3x3, stride 2, ceil mode
    sizes = [(conv(conv(70)), conv(conv(90)))]
    for _ in range(3):
        sizes.append(tuple(pool(v) for v in sizes[-1]))
    for (k, v), c, hw in zip(out.items(), spec[2], sizes):
        assert tuple(v.shape) == (1, c, *hw), k
    assert frozen.out_features == ["stage3", "stage4", "stage5"] and frozen.out_channels == list(spec[2][1:])
    with pytest.raises(ValueError, match="unknown VoVNet"):
        vovnet("V-21")
    with pytest.raises(ValueError, match="norm must be"):
        vovnet("V-19", norm="ln")


def _unit_ref(x, seq):
    """conv -> BN (eval) -> ReLU from the layers' tensors, written out with functional ops."""
    if hasattr(seq, "dw_conv"):
        x = F.conv2d(x, seq.dw_conv.weight, None, seq.dw_conv.stride, 1, 1, x.shape[1])
        x = F.conv2d(x, seq.pw_conv.weight)
    else:
        k = seq.conv.weight.shape[-1]
        x = F.conv2d(x, seq.conv.weight, None, seq.conv.stride, k // 2)
    n = seq.norm
    x = (x - n.running_mean[:, None, None]) / torch.sqrt(n.running_var[:, None, None] + n.eps)
    return torch.clamp(x * n.weight[:, None, None] + n.bias[:, None, None], min=0)


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("identity", [False, True])
def test_osa_module_matches_a_functional_reference(seed, depthwise, identity):
    cin = 24 if identity else 16
    mod = OSAModule(cin, 8, 24, 3, "bn", identity=identity, depthwise=depthwise).double().eval()
    for m in mod.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    mod.ese.fc.bias.data.uniform_(-3, 3)
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    y = x if not depthwise or cin == 8 else _unit_ref(x, mod.reduction)
    outs = [x]
    for layer in mod.layers:
        y = _unit_ref(y, layer)
        outs.append(y)
    z = _unit_ref(torch.cat(outs, 1), mod.concat)
    gate = F.conv2d(z.mean((2, 3), keepdim=True), mod.ese.fc.weight, mod.ese.fc.bias)
    z = z * torch.clamp(gate + 3, 0, 6) / 6
    if identity:
        z = z + x
    torch.testing.assert_close(mod(x), z)
    assert (mod.reduction is not None) == (depthwise and cin != 8)


# ------------------------------------------------------------------------------------ FCOS

def _brute_targets(locs_per_level, strides, boxes, classes, k, soi, radius):
    """Per location and box, in Python floats: FCOS's rules read off the spec."""
    bounds = [-1.0] + list(soi) + [1e8]
    labels, regs, inds = [], [], []
    for lvl, (locs, s) in enumerate(zip(locs_per_level, strides)):
        lo, hi = bounds[lvl], bounds[lvl + 1]
        for x, y in locs.tolist():
            best, best_area = -1, None
            for g, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
                d = (x - x0, y - y0, x1 - x, y1 - y)
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                sx0, sy0 = max(cx - s * radius, x0), max(cy - s * radius, y0)
                sx1, sy1 = min(cx + s * radius, x1), min(cy + s * radius, y1)
                inside = min(x - sx0, y - sy0, sx1 - x, sy1 - y) > 0
                if not inside or not (lo <= max(d) <= hi):
                    continue
                area = (x1 - x0) * (y1 - y0)
                if best_area is None or area < best_area:  # strict: the lowest index wins ties
                    best, best_area = g, area
            if best < 0:
                labels.append(k)
                regs.append((0.0,) * 4)
                inds.append(-1)
            else:
                x0, y0, x1, y1 = boxes[best].tolist()
                labels.append(int(classes[best]))
                regs.append(tuple(v / s for v in (x - x0, y - y0, x1 - x, y1 - y)))
                inds.append(best)
    return torch.tensor(labels), torch.tensor(regs, dtype=torch.float64), torch.tensor(inds)


def test_fcos_targets_match_a_brute_force_assignment(seed):
    gen = torch.Generator().manual_seed(seed)
    strides = [8, 16, 32, 64, 128]
    h, w = 160, 224
    locs = [level_locations(math.ceil(h / s), math.ceil(w / s), s, dtype=torch.float64) for s in strides]
    soi = (24, 48, 96, 160)  # small ranges so that every level gets boxes on a small image
    for trial in range(4):
        g = int(torch.randint(1, 9, (), generator=gen))
        xy = torch.rand(g, 2, generator=gen, dtype=torch.float64) * torch.tensor([w - 10.0, h - 10.0])
        wh = 4 + torch.rand(g, 2, generator=gen, dtype=torch.float64) * 150
        boxes = torch.cat([xy, xy + wh], 1)
        # ties: a copy of box 0 (another class) and a box of box 0's area with its sides swapped
        x0, y0, x1, y1 = boxes[0].tolist()
        swapped = torch.tensor([[x0, y0, x0 + (y1 - y0), y0 + (x1 - x0)]], dtype=torch.float64)
        # and a box with a sure positive: P3 location (36, 36) has max distance 24, the top of P3's range
        boxes = torch.cat([boxes, boxes[:1], swapped, torch.tensor([[20.0, 20.0, 60.0, 60.0]], dtype=torch.float64)])
        classes = torch.randint(0, 5, (boxes.shape[0],), generator=gen)
        cls, reg, idx = fcos_targets(locs, strides, boxes, classes, 5, soi, True, 1.5)
        ecls, ereg, eidx = _brute_targets(locs, strides, boxes, classes, 5, soi, 1.5)
        assert torch.equal(idx, eidx) and torch.equal(cls, ecls)
        torch.testing.assert_close(reg[eidx >= 0], ereg[eidx >= 0])
        assert (cls < 5).sum() > 0
    # no ground truth: all background
    cls, reg, idx = fcos_targets(locs, strides, torch.zeros((0, 4)), torch.zeros((0,), dtype=torch.int64), 5)
    assert (cls == 5).all() and (idx == -1).all() and reg.shape == (sum(len(lo) for lo in locs), 4)


def test_level_locations_and_size_ranges():
    loc = level_locations(2, 3, 16)
    assert loc.tolist() == [[8, 8], [24, 8], [40, 8], [8, 24], [24, 24], [40, 24]]
    with pytest.raises(ValueError, match="sizes_of_interest"):
        fcos_targets([loc], [16], torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([0]), 3, (64, 128))


def test_giou_and_centerness_formulas(seed):
    pred = torch.rand(50, 4, dtype=torch.float64) * 10
    tgt = torch.rand(50, 4, dtype=torch.float64) * 10 + 0.1
    w = torch.rand(50, dtype=torch.float64)
    expected = 0.0
    for p, t, wi in zip(pred.tolist(), tgt.tolist(), w.tolist()):
        # as boxes around the location (0, 0)
        pb = (-p[0], -p[1], p[2], p[3])
        tb = (-t[0], -t[1], t[2], t[3])
        iw = max(0.0, min(pb[2], tb[2]) - max(pb[0], tb[0]))
        ih = max(0.0, min(pb[3], tb[3]) - max(pb[1], tb[1]))
        inter = iw * ih
        area = lambda b: (b[2] - b[0]) * (b[3] - b[1])  # noqa: E731
        union = area(pb) + area(tb) - inter
        enc = (max(pb[2], tb[2]) - min(pb[0], tb[0])) * (max(pb[3], tb[3]) - min(pb[1], tb[1]))
        giou = (inter + 1) / (union + 1) - (enc - union) / enc
        expected += wi * (1 - giou)
    torch.testing.assert_close(giou_loss(pred, tgt, w), torch.tensor(expected, dtype=torch.float64))
    ctr = centerness_targets(tgt)
    for c, (left, top, right, bottom) in zip(ctr.tolist(), tgt.tolist()):
        assert c == pytest.approx(math.sqrt(min(left, right) / max(left, right) * min(top, bottom) / max(top, bottom)))


def test_focal_loss_matches_torchvision(seed):
    tv_ops = pytest.importorskip("torchvision.ops")
    x = torch.randn(40, 6, dtype=torch.float64) * 3
    t = (torch.rand(40, 6) < 0.2).double()
    torch.testing.assert_close(sigmoid_focal_loss(x, t), tv_ops.sigmoid_focal_loss(x, t, 0.25, 2.0, "sum"))


def test_fcos_losses_normalisation(seed):
    k, strides = 3, [8, 16]
    logits = [torch.randn(2, k, 4, 4), torch.randn(2, k, 2, 2)]
    regs = [torch.rand(2, 4, 4, 4) * 3, torch.rand(2, 4, 2, 2) * 3]
    ctrs = [torch.randn(2, 1, 4, 4), torch.randn(2, 1, 2, 2)]
    locs = [level_locations(4, 4, 8), level_locations(2, 2, 16)]
    targets = [(torch.tensor([[2.0, 3, 20, 25]]), torch.tensor([1])), (torch.tensor([[1.0, 1, 31, 30]]), torch.tensor([2]))]
    lab, rg = zip(*[fcos_targets(locs, strides, b, c, k, (10,))[:2] for b, c in targets])
    lab, rg = torch.stack(lab), torch.stack(rg)
    out = fcos_losses(logits, regs, ctrs, lab, rg, k)
    # by hand, over the flattened locations
    fl = lambda xs, c: torch.cat([x.permute(0, 2, 3, 1).reshape(2, -1, c) for x in xs], 1).reshape(-1, c)  # noqa: E731
    cls_p, reg_p, ctr_p = fl(logits, k), fl(regs, 4), fl(ctrs, 1)[:, 0]
    lab, rg = lab.reshape(-1), rg.reshape(-1, 4)
    pos = lab < k
    onehot = F.one_hot(lab, k + 1)[:, :k].float()
    npos = max(float(pos.sum()), 1.0)
    torch.testing.assert_close(out["loss_fcos_cls"], sigmoid_focal_loss(cls_p, onehot) / npos)
    ct = centerness_targets(rg[pos])
    torch.testing.assert_close(out["loss_fcos_loc"], giou_loss(reg_p[pos], rg[pos], ct) / ct.sum())
    torch.testing.assert_close(out["loss_fcos_ctr"],
                               F.binary_cross_entropy_with_logits(ctr_p[pos], ct, reduction="sum") / npos)
    # no positives: zero losses that still reach every prediction
    empty = fcos_losses(logits, regs, ctrs, torch.full_like(lab, k).reshape(2, -1), rg.reshape(2, -1, 4) * 0, k)
    assert empty["loss_fcos_loc"].item() == 0 and empty["loss_fcos_ctr"].item() == 0


def test_fcos_inference_matches_a_reference(seed):
    tv_ops = pytest.importorskip("torchvision.ops")
    k, strides = 4, [8, 16]
    logits = [torch.randn(2, k, 6, 8) - 1.0, torch.randn(2, k, 3, 4) - 1.0]
    regs = [torch.rand(2, 4, 6, 8) * 3, torch.rand(2, 4, 3, 4) * 3]
    ctrs = [torch.randn(2, 1, 6, 8), torch.randn(2, 1, 3, 4)]
    locs = [level_locations(6, 8, 8), level_locations(3, 4, 16)]
    top_pre, top_post = 30, 12
    out = fcos_inference(logits, regs, ctrs, locs, strides, 0.05, top_pre, 0.6, top_post)
    for i in range(2):
        boxes, scores, classes = [], [], []
        for lg, rg, ct, loc, s in zip(logits, regs, ctrs, locs, strides):
            cand = []
            h, w = lg.shape[-2:]
            for yy in range(h):
                for xx in range(w):
                    for c in range(k):
                        p = torch.sigmoid(lg[i, c, yy, xx])
                        if p > 0.05:
                            cand.append((float(p * torch.sigmoid(ct[i, 0, yy, xx])), yy * w + xx, c))
            cand.sort(key=lambda t: -t[0])
            for sc, li, c in cand[:top_pre]:
                x, y = loc[li].tolist()
                d = (rg[i, :, li // w, li % w] * s).tolist()
                boxes.append([x - d[0], y - d[1], x + d[2], y + d[3]])
                scores.append(math.sqrt(sc))
                classes.append(c)
        boxes, scores, classes = torch.tensor(boxes), torch.tensor(scores), torch.tensor(classes)
        keep = tv_ops.batched_nms(boxes, scores, classes, 0.6)[:top_post]
        got = out[i]
        order = torch.argsort(got["scores"], descending=True)
        assert len(got["scores"]) == len(keep)
        torch.testing.assert_close(got["scores"][order], scores[keep])
        torch.testing.assert_close(got["boxes"][order], boxes[keep])
        assert torch.equal(got["classes"][order], classes[keep])


# ------------------------------------------------------------------------------------ mask branch

def test_spatial_attention_and_sag_head(seed):
    sam = SpatialAttention(3).double()
    x = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    mean = x.sum(1) / 5
    mx = x.sort(dim=1).values[:, -1]
    wgt = sam.conv.weight[0]  # [2, 3, 3]
    pad = F.pad(torch.stack([mean, mx], 1), (1, 1, 1, 1))
    att = torch.zeros(3, 6, 7, dtype=torch.float64)
    for dy in range(3):
        for dx in range(3):
            att += (pad[:, :, dy:dy + 6, dx:dx + 7] * wgt[:, dy, dx][None, :, None, None]).sum(1)
    torch.testing.assert_close(sam(x), x * torch.sigmoid(att)[:, None])
    assert sam.conv.bias is None
    head = SAGMaskHead(8, 3, conv_dim=16, num_convs=2)
    assert head(torch.randn(4, 8, 14, 14)).shape == (4, 3, 28, 28)
    with pytest.raises(ValueError, match="kernel"):
        SpatialAttention(5)


def test_box_mask_fraction_and_maskiou_targets(seed):
    gen = torch.Generator().manual_seed(seed)
    masks = (torch.rand(3, 20, 24, generator=gen) < 0.3).to(torch.uint8)
    masks[2] = 0  # an empty mask
    boxes = torch.rand(10, 2, generator=gen) * 20
    boxes = torch.cat([boxes - 3, boxes + torch.rand(10, 2, generator=gen) * 12], 1)
    matched = torch.randint(0, 3, (10,), generator=gen)
    frac = box_mask_fraction(masks, boxes, matched)
    for f, b, m in zip(frac.tolist(), boxes.tolist(), matched.tolist()):
        total = int(masks[m].sum())
        inside = sum(int(masks[m, i, j]) for i in range(20) for j in range(24)
                     if b[0] <= j + 0.5 < b[2] and b[1] <= i + 0.5 < b[3])
        assert f == pytest.approx(inside / total if total else 0.0)
    logits = torch.randn(10, 28, 28)
    gt = (torch.rand(10, 28, 28) < 0.5).float()
    got = maskiou_targets(logits, gt, frac)
    for t, lg, g, f in zip(got.tolist(), logits, gt, frac.tolist()):
        p = lg > 0
        inter = float((p & (g > 0)).sum())
        full = float(g.sum()) / max(min(f, 1.0), 1e-10)
        assert t == pytest.approx(inter / max(float(p.sum()) + full - inter, 1.0), rel=1e-5)
    pred = torch.rand(10, 4, requires_grad=True)
    cls = torch.randint(0, 4, (10,))
    loss = maskiou_loss(pred, cls, got)
    pos = got > 0
    expected = (0.5 * (pred[pos, cls[pos]] - got[pos]) ** 2).sum() / pos.sum()
    assert loss.item() == pytest.approx(expected.item())
    zero = maskiou_loss(pred, cls, torch.zeros(10))
    zero.backward()
    assert zero.item() == 0 and pred.grad is not None


def test_scale_adaptive_level_uses_each_images_unpadded_size(seed):
    heads = CenterMaskHeads(in_features=["p3", "p4", "p5"], in_channels=4, num_classes=2, conv_dim=8, num_convs=1)
    feats = {f"p{i}": torch.randn(2, 4, 256 // 2 ** i, 256 // 2 ** i) for i in (3, 4, 5)}
    sizes = [(256, 256), (120, 100)]  # the second image is padded to 256 x 256 in the batch
    box = torch.tensor([[10.0, 12.0, 90.0, 95.0]])  # 80 x 83 px
    boxes = [box, box.clone()]
    pooled = heads.pool(feats, boxes, sizes)
    for i, (h, w) in enumerate(sizes):
        area = 80.0 * 83.0
        lvl = min(max(math.ceil(5 - math.log2(h * w / area)), 3), 5)
        ref = instseg_ops.roi_align(feats[f"p{lvl}"][i:i + 1], [box], 14, 1 / 2 ** lvl, 0, aligned=True)
        torch.testing.assert_close(pooled[i:i + 1], ref)
    # different levels for the two images: P3 for the full image, P5 for the small one
    assert math.ceil(5 - math.log2(256 * 256 / 6640)) <= 3 and math.ceil(5 - math.log2(120 * 100 / 6640)) >= 5


def test_heads_compile_without_graph_breaks(seed):
    fcos_head = FCOSHead(16, 3, num_convs=1, num_levels=2)
    heads = CenterMaskHeads(in_features=["p3", "p4", "p5"], in_channels=16, num_classes=3, conv_dim=16,
                            num_convs=1).eval()
    feats = {f"p{i}": torch.randn(1, 16, 64 // 2 ** i, 64 // 2 ** i) for i in (3, 4, 5)}
    boxes = [torch.tensor([[1.0, 2.0, 30.0, 40.0], [5.0, 5.0, 60.0, 50.0]])]

    def run(f, b):
        logits, regs, ctrs = fcos_head([f["p3"], f["p4"]])
        x = heads.pool(f, b, [(64, 64)])
        m = heads.mask_head(x)
        iou = heads.maskiou_head(x, m[:, :1].sigmoid())
        return logits[0], regs[1], ctrs[0], m, iou

    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    for a, b in zip(compiled(feats, boxes), run(feats, boxes)):
        torch.testing.assert_close(a, b)


def test_maskiou_head_shapes():
    head = MaskIoUHead(8, 5, conv_dim=16, num_convs=2)
    assert head(torch.randn(3, 8, 14, 14), torch.rand(3, 1, 28, 28)).shape == (3, 5)
    assert head.convs[-2].stride == (2, 2) and head.fc1.in_features == 16 * 7 * 7


# ------------------------------------------------------------------------------------ the model

def _tiny(**kw):
    return get_model("centermask_lite_shapes", min_size=64, max_size=64, fpn_channels=64,
                     mask_batch_size_per_image=32, **kw)


def _targets(sizes, gen, empty_index=None):
    out = []
    for i, (h, w) in enumerate(sizes):
        k = 0 if i == empty_index else int(torch.randint(1, 4, (), generator=gen))
        xy = torch.rand(k, 2, generator=gen) * torch.tensor([w - 24.0, h - 24.0])
        wh = 8 + torch.rand(k, 2, generator=gen) * 14
        boxes = torch.cat([xy, xy + wh], 1)
        masks = torch.zeros(k, h, w, dtype=torch.uint8)
        for j, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            masks[j, y0:y1, x0:x1] = 1
        out.append({"boxes": boxes, "labels": torch.randint(1, 7, (k,), generator=gen), "masks": masks})
    return out


def test_registered_models_and_configs():
    names = set(list_models())
    assert {"centermask_v39", "centermask_v57", "centermask_v99", "centermask_lite_v19", "centermask_lite_v39",
            "centermask_lite_v19_slim_dw", "centermask_lite_shapes"} <= names
    lite = get_model("centermask_lite_v19_slim_dw")
    assert lite.backbone.out_channels == 128 and len(lite.fcos.head.cls_tower) == 6
    assert lite.fcos.head.cls_logits.out_channels == 80 and lite.roi_heads.mask_head.predictor.out_channels == 80
    assert lite.backbone.out_features == ["stage3", "stage4", "stage5", "p6", "p7"]
    assert [lite.backbone.strides[f] for f in lite.backbone.out_features] == [8, 16, 32, 64, 128]
    assert lite.fcos.post_nms_top_k == {"train": 100, "test": 50} and lite.transform.min_size == (580, 600)
    from instseg_ops.models.engine.presets import PRESETS
    assert PRESETS["shapes_centermask_lite_cpu"].arch == "centermask_lite_shapes"


def test_training_and_evaluation_with_empty_images(seed):
    gen = torch.Generator().manual_seed(seed)
    model = _tiny()
    sizes = [(64, 64), (48, 60), (64, 50)]
    images = [torch.rand(3, h, w, generator=gen) for h, w in sizes]
    targets = _targets(sizes, gen, empty_index=1)
    model.train()
    losses = model(images, targets)
    assert set(losses) == {"loss_fcos_cls", "loss_fcos_loc", "loss_fcos_ctr", "loss_mask", "loss_maskiou"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.roi_heads.mask_head.predictor.weight.grad is not None
    # a batch without any annotation
    model.zero_grad()
    losses = model(images[:2], [_targets([s], gen, empty_index=0)[0] for s in sizes[:2]])
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    for o, (h, w) in zip(out, sizes):
        assert set(o) == {"boxes", "labels", "scores", "masks", "mask_scores"}
        k = len(o["scores"])
        assert o["masks"].shape == (k, 1, h, w) and o["mask_scores"].shape == (k,)
        assert (o["boxes"][:, 0::2] <= w).all() and (o["boxes"][:, 1::2] <= h).all() and (o["boxes"] >= 0).all()
        assert k == 0 or (o["labels"].min() >= 1 and o["labels"].max() <= 6)
    # no detections at all: empty outputs of the right shapes
    model.fcos.score_thresh["test"] = 1.1
    with torch.no_grad():
        out = model(images[:1])
    assert out[0]["masks"].shape == (0, 1, 64, 64) and out[0]["boxes"].shape == (0, 4)


def test_bad_inputs_get_clear_errors(seed):
    model = _tiny().train()
    img = [torch.rand(3, 64, 64)]
    good = _targets([(64, 64)], torch.Generator().manual_seed(1))[0]
    with pytest.raises(ValueError, match="targets are required"):
        model(img)
    with pytest.raises(ValueError, match="labels must be in"):
        model(img, [{**good, "labels": good["labels"] * 0 + 7}])
    with pytest.raises(ValueError, match="positive width"):
        model(img, [{**good, "boxes": good["boxes"][:, [2, 3, 0, 1]]}])
    with pytest.raises(ValueError, match="masks must be"):
        model(img, [{**good, "masks": good["masks"][:, :10]}])
    with pytest.raises(ValueError, match="needs 'masks'"):
        model(img, [{"boxes": good["boxes"], "labels": good["labels"]}])
    with pytest.raises(ValueError, match="num_classes"):
        get_model("centermask_lite_shapes", num_classes=1)


def test_the_trainer_trains_and_evaluates_centermask(tmp_path, seed):
    """The preset through the unchanged Trainer (tiny sizes): losses by CenterMask's names, the
    final evaluation with the MaskIoU-rescored and the unscored mask AP, and the checkpoint
    rebuilt by model_from_checkpoint predicting the same as the trained model."""
    from instseg_ops.models.data import generate_split
    from instseg_ops.models.engine import checkpoint, presets, trainer
    root = str(tmp_path / "shapes")
    generate_split(root, "train", 4, size=64, seed=seed % 1000, max_objects=3)
    generate_split(root, "val", 2, size=64, seed=seed % 1000 + 1, max_objects=3)
    p = presets.get_preset("shapes_centermask_lite_cpu", iters=2, batch_size=2, time_budget=0.0, scale_schedule=(),
                           cache_data=False, eval_period=0, checkpoint_period=0, log_period=1, warmup_iters=1,
                           model={"min_size": 64, "max_size": 64, "mask_batch_size_per_image": 32})
    run = str(tmp_path / "run")
    res = trainer.train(p, root, run, device="cpu", seed=0, log=lambda *a, **k: None)
    assert res["iteration"] == 2
    assert set(res["eval"]) == {"bbox", "segm", "segm_unscored"}
    model, categories, _ = checkpoint.model_from_checkpoint(f"{run}/model_final.pth")
    assert type(model).__name__ == "CenterMask" and len(categories) == 6


def _to_centermask2_names(sd):
    """This model's keys written in centermask2's naming (read from its vovnet.py, fcos.py,
    sam.py, maskiou_head.py and detectron2's FPN), the reverse direction of the loader."""
    import re
    out = {}
    for k, v in sd.items():
        n = k.replace("backbone.body.", "backbone.bottom_up.")
        m = re.match(r"backbone\.bottom_up\.stem\.(stem_\d)\.(\w+)\.(.*)", n)
        if m:
            part = {"conv": "conv", "norm": "norm", "dw_conv": "dw_conv3x3", "pw_conv": "pw_conv1x1"}[m.group(2)]
            if part == "norm" and "stem_1" not in m.group(1) and any("stem_2.dw_conv" in x for x in sd):
                part = "pw_norm"
            n = f"backbone.bottom_up.stem.{m.group(1)}/{part}.{m.group(3)}"
        m = re.match(r"backbone\.bottom_up\.stage(\d)\.osa(\d+)\.(layers\.(\d+)|concat|reduction|ese)\.(.*)", n)
        if m:
            s, j, what, rest = m.group(1), m.group(2), m.group(3), m.group(5)
            osa = f"OSA{s}_{j}"
            dw = any("dw_conv" in x for x in sd)
            if what == "ese":
                n = f"backbone.bottom_up.stage{s}.{osa}.ese.{rest}"
            else:
                mod, part = rest.split(".", 1)
                if what.startswith("layers") and dw:
                    mod = {"dw_conv": "dw_conv3x3", "pw_conv": "pw_conv1x1", "norm": "pw_norm"}[mod]
                if what.startswith("layers"):
                    n = f"backbone.bottom_up.stage{s}.{osa}.layers.{m.group(4)}.{osa}_{m.group(4)}/{mod}.{part}"
                elif what == "concat":
                    n = f"backbone.bottom_up.stage{s}.{osa}.concat.{osa}_concat/{mod}.{part}"
                else:
                    n = f"backbone.bottom_up.stage{s}.{osa}.conv_reduction.{osa}_reduction_0/{mod}.{part}"
        m = re.match(r"backbone\.fpn\.(inner|layer)_blocks\.(\d)\.0\.(.*)", n)
        if m:
            n = f"backbone.fpn_{'lateral' if m.group(1) == 'inner' else 'output'}{int(m.group(2)) + 3}.{m.group(3)}"
        n = n.replace("backbone.fpn.top_block.", "backbone.top_block.").replace("fcos.head.", "proposal_generator.fcos_head.")
        m = re.match(r"roi_heads\.(mask|maskiou)_head\.convs\.(\d+)\.(.*)", n)
        if m:
            n = f"roi_heads.{m.group(1)}_head.{m.group(1)}_fcn{int(m.group(2)) // 2 + 1}.{m.group(3)}"
        n = n.replace("roi_heads.mask_head.attention.", "roi_heads.mask_head.spatialAtt.")
        n = re.sub(r"roi_heads\.maskiou_head\.fc(\d)\.", r"roi_heads.maskiou_head.maskiou_fc\1.", n)
        n = n.replace("roi_heads.maskiou_head.predictor.", "roi_heads.maskiou_head.maskiou.")
        if n.startswith("proposal_generator.fcos_head.scales."):
            v = v.reshape(1)
        if n == "backbone.bottom_up.stem.stem_1/conv.weight":
            v = v.flip(1)  # centermask2 reads BGR
        out[n] = v
    return out


@pytest.mark.parametrize("name", ["centermask_lite_v19_slim_dw", "centermask_lite_v19"])
def test_centermask2_checkpoints_load(name, seed):
    from instseg_ops.models import load_pretrained
    src = get_model(name, num_classes=5)
    for p in src.state_dict().values():
        if p.is_floating_point():
            p.copy_(torch.randn_like(p))
    ref = _to_centermask2_names(src.state_dict())
    # spot checks of centermask2's key names as its source writes them
    expected = {"backbone.bottom_up.stem.stem_1/conv.weight", "backbone.bottom_up.stage2.OSA2_1.ese.fc.bias",
                "backbone.fpn_lateral3.weight", "backbone.top_block.p6.weight", "proposal_generator.fcos_head.ctrness.bias",
                "roi_heads.mask_head.spatialAtt.conv.weight", "roi_heads.maskiou_head.maskiou_fc2.weight",
                "proposal_generator.fcos_head.scales.4.scale"}
    if name.endswith("dw"):
        expected |= {"backbone.bottom_up.stem.stem_2/dw_conv3x3.weight",
                     "backbone.bottom_up.stage2.OSA2_1.layers.0.OSA2_1_0/pw_norm.running_mean",
                     "backbone.bottom_up.stage3.OSA3_1.conv_reduction.OSA3_1_reduction_0/conv.weight"}
    else:
        expected |= {"backbone.bottom_up.stage2.OSA2_1.layers.2.OSA2_1_2/conv.weight",
                     "backbone.bottom_up.stage5.OSA5_1.concat.OSA5_1_concat/norm.bias"}
    assert expected <= set(ref)
    ref["pixel_mean"] = torch.zeros(3, 1, 1)
    dst = get_model(name, num_classes=5)
    res = load_pretrained(dst, {"model": ref})
    assert res.layout == "centermask2" and not res.missing_keys and not res.unexpected_keys
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
