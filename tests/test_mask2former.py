"""Mask2Former: equal logits to transformers' Mask2FormerForUniversalSegmentation (ResNet
backbone, random weights, copied through load_pretrained), the official key layout, the
matcher against brute force, point and importance sampling, the attention mask, instance
inference, training and evaluation paths, torch.compile of the pixel decoder."""
import itertools
import math
import os

import pytest
import torch
import torch.nn.functional as F

import instseg_ops.models as zoo
from instseg_ops.models.mask2former import (HungarianMatcher, MSDeformAttnPixelDecoder, attention_mask_from_logits,
                                            instance_inference, mask2former_resnet, point_sample,
                                            uncertain_point_coords)
from instseg_ops.models.mask2former.layouts import to_official

SMALL = dict(depth=18, width=16, conv_dim=64, mask_dim=64, enc_layers=2, enc_heads=4, enc_ffn=128, hidden_dim=64,
             num_queries=10, dec_heads=4, dec_ffn=128, dec_layers=4)


def hf_pair(seed, small=True, num_labels=5):
    """transformers' model with every parameter and BatchNorm statistic re-randomised, and
    ours with its state dict loaded through load_pretrained (layout recognised)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig
    torch.manual_seed(seed)
    if small:
        bc = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], layer_type="basic",
                          out_features=["stage1", "stage2", "stage3", "stage4"])
        cfg = Mask2FormerConfig(backbone_config=bc, num_labels=num_labels, num_queries=10, hidden_dim=64,
                                feature_size=64, mask_feature_size=64, encoder_feedforward_dim=128,
                                dim_feedforward=128, decoder_layers=5, encoder_layers=2, num_attention_heads=4)
        ours = mask2former_resnet(num_classes=num_labels + 1, **SMALL)
    else:
        bc = ResNetConfig(out_features=["stage1", "stage2", "stage3", "stage4"])  # ResNet-50
        cfg = Mask2FormerConfig(backbone_config=bc, num_labels=num_labels)
        ours = zoo.get_model("mask2former_resnet50", num_classes=num_labels + 1)
    ref = Mask2FormerForUniversalSegmentation(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.normal_(0, 0.2 if small else 0.05)
        for name, b in ref.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.2)
    result = zoo.load_pretrained(ours, ref.state_dict())
    assert result.layout == "transformers"
    return ref, ours.eval()


def check_equal(ref, ours, x, tol=1e-4):
    with torch.no_grad():
        out = ref(pixel_values=x, output_auxiliary_logits=True)
        cls, masks = ours.forward_logits(x)
        c, m = ours.logits(x)
    assert c.shape == out.class_queries_logits.shape and m.shape == out.masks_queries_logits.shape
    assert m.shape[-2:] == (x.shape[-2] // 4, x.shape[-1] // 4)
    torch.testing.assert_close(c, out.class_queries_logits, atol=tol, rtol=tol)
    torch.testing.assert_close(m, out.masks_queries_logits, atol=tol, rtol=tol)
    # every auxiliary prediction (the learnable queries' and each layer's but the last)
    assert len(out.auxiliary_logits) == len(cls) - 1
    for aux, ca, ma in zip(out.auxiliary_logits, cls[:-1], masks[:-1]):
        torch.testing.assert_close(ca, aux["class_queries_logits"], atol=tol, rtol=tol)
        torch.testing.assert_close(ma, aux["masks_queries_logits"], atol=tol, rtol=tol)
    return c, m, masks


def test_logits_equal_transformers_small(seed):
    # non-trivial: masks vary, and some attention mask blocks part of the pixels; random weights
    # rarely give no such mask, so up to 4 draws are compared (every one must be equal)
    for k in range(4):
        ref, ours = hf_pair(seed + k)
        x = torch.randn(2, 3, 96, 128)
        c, m, masks = check_equal(ref, ours, x)
        if m.std() > 0.1 and any(0.0 < (mk > 0).float().mean().item() < 1.0 for mk in masks[:-1]):
            return
    pytest.fail("4 random models in a row gave no partially blocked attention mask")


@pytest.mark.slow
def test_logits_equal_transformers_r50_default_dims(seed):
    ref, ours = hf_pair(seed, small=False, num_labels=80)
    check_equal(ref, ours, torch.randn(1, 3, 128, 160))


def test_official_layout(seed):
    ref, ours = hf_pair(seed)
    official = to_official(ours)
    # names of the official checkpoints (models.md 3.9)
    for key in ("sem_seg_head.pixel_decoder.input_proj.0.1.weight", "sem_seg_head.pixel_decoder.transformer.level_embed",
                "sem_seg_head.pixel_decoder.transformer.encoder.layers.1.self_attn.sampling_offsets.weight",
                "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.linear1.weight",
                "sem_seg_head.pixel_decoder.transformer.encoder.layers.0.norm2.bias",
                "sem_seg_head.pixel_decoder.mask_features.weight", "sem_seg_head.pixel_decoder.adapter_1.weight",
                "sem_seg_head.pixel_decoder.adapter_1.norm.weight", "sem_seg_head.pixel_decoder.layer_1.norm.bias",
                "sem_seg_head.predictor.query_feat.weight", "sem_seg_head.predictor.query_embed.weight",
                "sem_seg_head.predictor.level_embed.weight",
                "sem_seg_head.predictor.transformer_self_attention_layers.0.self_attn.in_proj_weight",
                "sem_seg_head.predictor.transformer_cross_attention_layers.2.multihead_attn.out_proj.weight",
                "sem_seg_head.predictor.transformer_cross_attention_layers.2.norm.weight",
                "sem_seg_head.predictor.transformer_ffn_layers.3.linear2.bias",
                "sem_seg_head.predictor.decoder_norm.weight", "sem_seg_head.predictor.class_embed.weight",
                "sem_seg_head.predictor.mask_embed.layers.2.weight", "backbone.stem.conv1.weight",
                "backbone.stem.conv1.norm.running_var", "backbone.res3.0.shortcut.weight",
                "backbone.res3.0.shortcut.norm.bias", "backbone.res5.1.conv2.norm.weight"):
        assert key in official, key
    official["pixel_mean"] = torch.zeros(3, 1, 1)
    fresh = mask2former_resnet(num_classes=6, **SMALL).eval()
    result = zoo.load_pretrained(fresh, official)
    assert result.layout == "mask2former_official"
    check_equal(ref, fresh, torch.randn(1, 3, 64, 96))


# ---------------------------------------------------------------------------
# Matcher, sampling, attention mask, inference


def test_point_sample_is_bilinear(seed):
    feats = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    coords = torch.rand(2, 11, 2, dtype=torch.float64) * 1.2 - 0.1
    out = point_sample(feats, coords)
    for n in range(2):
        for p in range(11):
            x = coords[n, p, 0].item() * 7 - 0.5
            y = coords[n, p, 1].item() * 5 - 0.5
            x0, y0 = math.floor(x), math.floor(y)
            val = torch.zeros(3, dtype=torch.float64)
            for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                    if 0 <= yy < 5 and 0 <= xx < 7:
                        val += wy * wx * feats[n, :, yy, xx]
            torch.testing.assert_close(out[n, :, p], val)


def test_importance_sampling(seed):
    logits = torch.randn(3, 1, 16, 16) * 4
    g = torch.Generator().manual_seed(seed)
    num, over, ratio = 40, 3.0, 0.75
    coords = uncertain_point_coords(logits, num, over, ratio, generator=g)
    assert coords.shape == (3, num, 2)
    g.manual_seed(seed)
    candidates = torch.rand(3, int(num * over), 2, generator=g)
    fresh = torch.rand(3, num - int(num * ratio), 2, generator=g)
    n_imp = int(num * ratio)
    unc = -point_sample(logits, candidates)[:, 0].abs()
    for n in range(3):
        order = torch.argsort(unc[n], descending=True)
        expect = candidates[n, order[:n_imp]]
        got = coords[n, :n_imp]
        # the same set of points (ties aside, uncertainties are distinct)
        assert torch.equal(got[torch.argsort(got[:, 0])], expect[torch.argsort(expect[:, 0])])
        assert -point_sample(logits[n:n + 1], got[None])[0, 0].abs().min() >= unc[n, order[n_imp:]].max() - 1e-6
    torch.testing.assert_close(coords[:, n_imp:], fresh)
    assert (coords >= 0).all() and (coords < 1).all()
    with pytest.raises(ValueError):
        uncertain_point_coords(logits, num, 0.5, ratio)


@pytest.mark.parametrize("q,t", [(4, 3), (5, 5), (6, 2), (3, 1)])
def test_matcher_brute_force(seed, q, t):
    k = 4
    cls = torch.randn(q, k + 1)
    masks_pred = torch.randn(q, 8, 8) * 3
    labels = torch.randint(0, k, (t,))
    masks_gt = (torch.rand(t, 32, 32) > 0.5).to(torch.uint8)
    matcher = HungarianMatcher(2.0, 5.0, 5.0, num_points=64)
    g = torch.Generator().manual_seed(seed)
    cost = matcher.cost_matrix(cls, masks_pred, labels, masks_gt, generator=g)
    # independent cost: per pair, on the same points
    g.manual_seed(seed)
    pts = torch.rand(1, 64, 2, generator=g)
    prob = cls.softmax(-1)
    for i in range(q):
        lp = point_sample(masks_pred[i][None, None], pts)[0, 0]
        for j in range(t):
            tp = point_sample(masks_gt[j][None, None].float(), pts)[0, 0]
            bce = F.binary_cross_entropy_with_logits(lp, tp)
            s = lp.sigmoid()
            dice = 1 - (2 * (s * tp).sum() + 1) / (s.sum() + tp.sum() + 1)
            expect = 5 * bce + 2 * -prob[i, labels[j]] + 5 * dice
            torch.testing.assert_close(cost[i, j], expect, atol=1e-5, rtol=1e-5)
    # the assignment minimises the total cost (brute force over all injective maps)
    g.manual_seed(seed)
    (rows, cols), = matcher(cls[None], masks_pred[None], [{"labels": labels, "masks": masks_gt}], generator=g)
    assert len(rows) == min(q, t) and len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    got = cost[rows, cols].sum()
    if t <= q:
        best = min(sum(cost[p[j], j] for j in range(t)) for p in itertools.permutations(range(q), t))
    else:
        best = min(sum(cost[i, p[i]] for i in range(q)) for p in itertools.permutations(range(t), q))
    torch.testing.assert_close(got, torch.as_tensor(best), atol=1e-5, rtol=1e-5)


def test_matcher_empty_targets():
    matcher = HungarianMatcher(num_points=16)
    out = matcher(torch.randn(2, 5, 4), torch.randn(2, 5, 8, 8),
                  [{"labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 32, 32, dtype=torch.uint8)}] * 2)
    assert all(r.numel() == 0 and c.numel() == 0 for r, c in out)


def test_attention_mask(seed):
    logits = torch.randn(2, 5, 16, 20) * 3
    logits[0, 1] = -5.0  # blocked everywhere: unblocked
    logits[1, 3] = 5.0
    allowed = attention_mask_from_logits(logits, (4, 5))
    assert allowed.dtype == torch.bool and allowed.shape == (2, 5, 20)
    resized = F.interpolate(logits, size=(4, 5), mode="bilinear", align_corners=False).flatten(2)
    expect = resized.sigmoid() >= 0.5
    full_block = ~expect.any(-1)
    expect[full_block] = True
    assert full_block[0, 1] and torch.equal(allowed, expect)
    assert allowed[1, 3].all()


def test_instance_inference_brute_force(seed):
    q, k = 7, 3
    cls = torch.randn(q, k + 1) * 2
    masks = torch.randn(q, 6, 9) * 2
    masks[2] = -1.0  # an empty mask: score 0
    r = instance_inference(cls, masks, topk=10)
    prob = cls.softmax(-1)
    entries = sorted(((prob[i, c].item(), i, c) for i in range(q) for c in range(k)), reverse=True)[:10]
    assert r["scores"].shape == (10,) and r["masks"].shape == (10, 6, 9)
    for n, (p, i, c) in enumerate(entries):
        assert r["queries"][n].item() == i and r["labels"][n].item() == c
        inside = masks[i] > 0
        mean = masks[i].sigmoid()[inside].sum() / (inside.sum() + 1e-6)
        torch.testing.assert_close(r["scores"][n], torch.tensor(p) * mean)
        assert torch.equal(r["masks"][n], inside)
        if inside.any():
            ys, xs = torch.nonzero(inside, as_tuple=True)
            assert r["boxes"][n].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
        else:
            assert r["scores"][n] == 0 and r["boxes"][n].abs().sum() == 0
    # fewer pairs than topk
    assert instance_inference(cls[:2], masks[:2], topk=100)["scores"].shape == (6,)


# ---------------------------------------------------------------------------
# Training and evaluation through the detector interface


def tiny_model(**kw):
    return mask2former_resnet(**{**SMALL, "num_classes": 4, "norm": "gn", "min_size": 64, "max_size": 64,
                                 "train_num_points": 256, **kw})


def targets_for(images, counts, g):
    out = []
    for img, n in zip(images, counts):
        h, w = img.shape[-2:]
        masks = torch.zeros(n, h, w, dtype=torch.uint8)
        boxes = torch.zeros(n, 4)
        for j in range(n):
            y0, x0 = int(torch.randint(0, h // 2, (1,), generator=g)), int(torch.randint(0, w // 2, (1,), generator=g))
            masks[j, y0:y0 + h // 3, x0:x0 + w // 3] = 1
            boxes[j] = torch.tensor([x0, y0, x0 + w // 3, y0 + h // 3])
        out.append({"boxes": boxes, "labels": torch.randint(1, 4, (n,), generator=g), "masks": masks})
    return out


@pytest.mark.parametrize("counts", [(2, 3), (0, 2), (0, 0)], ids=["some", "one_empty", "all_empty"])
def test_training_losses(seed, counts):
    g = torch.Generator().manual_seed(seed)
    model = tiny_model().train()
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    targets = targets_for(images, counts, g)
    if counts[0]:
        del targets[0]["boxes"]  # optional
    losses = model(images, targets)
    n_pred = SMALL["dec_layers"] + 1
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice")
                           for s in [""] + [f"_{i}" for i in range(n_pred - 1)]}
    assert all(torch.isfinite(v) for v in losses.values())
    if sum(counts) == 0:
        assert all(losses[k] == 0 for k in losses if not k.startswith("loss_ce"))
    else:
        assert losses["loss_mask"] > 0 and losses["loss_dice"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.predictor.parameters() if p.requires_grad]
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)


def test_training_rejects_bad_labels():
    model = tiny_model().train()
    img = [torch.rand(3, 64, 64)]
    t = [{"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([4]),
          "masks": torch.ones(1, 64, 64, dtype=torch.uint8)}]
    with pytest.raises(ValueError, match="labels"):
        model(img, t)
    with pytest.raises(ValueError, match="targets"):
        model(img)


def test_eval_outputs_and_no_object(seed):
    model = tiny_model(test_topk=7).eval()
    images = [torch.rand(3, 64, 64), torch.rand(3, 50, 40)]
    with torch.no_grad():
        out = model(images)
    for o, img in zip(out, images):
        assert set(o) == {"boxes", "labels", "scores", "masks"}
        assert o["masks"].shape == (7, 1) + tuple(img.shape[-2:])
        assert ((o["labels"] >= 1) & (o["labels"] <= 3)).all()
        assert torch.equal(o["masks"], (o["masks"] > 0.5).float())
        assert (o["scores"] >= 0).all() and (o["scores"] <= 1).all()
    # every query predicting no-object: still 7 (low-scored) instances, finite
    with torch.no_grad():
        model.predictor.class_embed.weight.zero_()
        model.predictor.class_embed.bias.copy_(torch.tensor([-30.0, -30.0, -30.0, 30.0]))
        out = model(images)
    assert all(o["scores"].shape == (7,) and torch.isfinite(o["scores"]).all() and (o["scores"] < 1e-6).all()
               for o in out)


def test_eval_mask_geometry_matches_reference_recipe(seed):
    """Masks: logits at 1/4 upsampled to the padded input, cropped to the resized image,
    resized to the original (what the official semantic-postprocess does)."""
    model = tiny_model(test_topk=5, min_size=64, max_size=96).eval()
    img = torch.rand(3, 40, 50)
    with torch.no_grad():
        batch, sizes, _ = model.transform([img])
        cls, masks = model.logits(batch)
        out = model([img])[0]
    m = F.interpolate(masks, size=batch.shape[-2:], mode="bilinear", align_corners=False)
    m = m[:, :, : sizes[0][0], : sizes[0][1]]
    m = F.interpolate(m, size=(40, 50), mode="bilinear", align_corners=False)[0]
    r = instance_inference(cls[0], m, 5)
    torch.testing.assert_close(out["scores"], r["scores"])
    assert torch.equal(out["masks"][:, 0].bool(), r["masks"])


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_pixel_decoder_compiles(seed, backend):
    """fullgraph: no graph break (the op's fake kernel traces); aot_eager keeps it fast,
    inductor (code generation, about 2 minutes on a busy CPU) is marked slow."""
    dec = MSDeformAttnPixelDecoder([16, 32, 64, 128], conv_dim=32, mask_dim=32, num_layers=1, n_heads=4, d_ffn=64)
    dec.eval()
    feats = [torch.randn(1, c, 32 // s, 48 // s) for c, s in zip([16, 32, 64, 128], [1, 2, 4, 8])]
    with torch.no_grad():
        ref_mask, ref_ms = dec(feats)
        torch._dynamo.reset()
        compiled = torch.compile(dec, fullgraph=True, backend=backend)
        mask, ms = compiled(feats)
    torch.testing.assert_close(mask, ref_mask, atol=1e-4, rtol=1e-4)
    for a, b in zip(ms, ref_ms):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_registered():
    names = zoo.list_models()
    for n in ("mask2former_resnet50", "mask2former_resnet101", "mask2former_r18_shapes", "maskformer_resnet50"):
        assert n in names


# ---------------------------------------------------------------------------
# MaskFormer


def hf_maskformer_pair(seed, num_labels=5):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig
    torch.manual_seed(seed)
    bc = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[2, 2, 2, 2], layer_type="basic",
                      out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = MaskFormerConfig(backbone_config=bc, num_labels=num_labels, fpn_feature_size=64, mask_feature_size=64,
                           decoder_config=dict(model_type="detr", d_model=64, decoder_layers=3, decoder_attention_heads=4,
                                               decoder_ffn_dim=128, num_queries=10))
    ref = MaskFormerForInstanceSegmentation(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.2)
        for name, b in ref.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 1.5)
            elif name.endswith("running_mean"):
                b.normal_(0, 0.2)
    ours = zoo.maskformer_resnet(18, num_labels + 1, width=16, conv_dim=64, mask_dim=64, hidden_dim=64, num_queries=10,
                                 n_heads=4, dim_feedforward=128, dec_layers=3)
    assert zoo.load_pretrained(ours, ref.state_dict()).layout == "transformers"
    return ref, ours.eval()


def test_maskformer_logits_equal_transformers(seed):
    ref, ours = hf_maskformer_pair(seed)
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        out = ref(pixel_values=x)
        c, m = ours.logits(x)
    assert m.shape == (2, 10, 24, 32)
    torch.testing.assert_close(c, out.class_queries_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(m, out.masks_queries_logits, atol=1e-4, rtol=1e-4)
    # the comparison can fail: one changed weight changes the logits
    with torch.no_grad():
        ours.predictor.layers[1].multihead_attn.in_proj_weight[70, 3] += 0.5
        assert not torch.allclose(ours.logits(x)[1], out.masks_queries_logits, atol=1e-4)
    # official layout round trip
    fresh = zoo.maskformer_resnet(18, 6, width=16, conv_dim=64, mask_dim=64, hidden_dim=64, num_queries=10, n_heads=4,
                                  dim_feedforward=128, dec_layers=3).eval()
    official = to_official(ours)
    for key in ("sem_seg_head.pixel_decoder.adapter_1.norm.weight", "sem_seg_head.pixel_decoder.layer_4.weight",
                "sem_seg_head.pixel_decoder.mask_features.weight", "sem_seg_head.predictor.query_embed.weight",
                "sem_seg_head.predictor.input_proj.weight",
                "sem_seg_head.predictor.transformer.decoder.layers.2.multihead_attn.in_proj_weight",
                "sem_seg_head.predictor.transformer.decoder.layers.0.norm3.bias",
                "sem_seg_head.predictor.transformer.decoder.norm.weight", "sem_seg_head.predictor.mask_embed.layers.1.bias"):
        assert key in official, key
    assert zoo.load_pretrained(fresh, official).layout == "mask2former_official"
    with torch.no_grad():
        torch.testing.assert_close(fresh.logits(x)[1], ours.logits(x)[1])


def test_maskformer_training_and_eval(seed):
    g = torch.Generator().manual_seed(seed)
    model = zoo.maskformer_resnet(18, 4, norm="gn", width=16, conv_dim=64, mask_dim=64, hidden_dim=64, num_queries=10,
                                  n_heads=4, dim_feedforward=128, dec_layers=3, min_size=64, max_size=64).train()
    images = [torch.rand(3, 64, 64, generator=g), torch.rand(3, 48, 64, generator=g)]
    losses = model(images, targets_for(images, (2, 0), g))
    assert set(losses) == {f"loss_{n}{s}" for n in ("ce", "mask", "dice") for s in ("", "_0", "_1")}
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()
    model.eval()
    with torch.no_grad():
        out = model(images)
    assert out[1]["masks"].shape == (30, 1, 48, 64) and out[0]["scores"].shape == (30,)


# ---------------------------------------------------------------------------
# The trainer and the evaluator run it unchanged


@pytest.fixture(scope="module")
def shapes2(tmp_path_factory):
    from instseg_ops.models.data import generate_split
    root = tmp_path_factory.mktemp("m2f_shapes")
    generate_split(str(root), "train", 2, size=64, seed=5, max_objects=3)
    generate_split(str(root), "val", 2, size=64, seed=6, max_objects=3)
    return str(root)


def test_preset_trains_and_evaluates(shapes2, tmp_path):
    from instseg_ops.models.engine import checkpoint, presets, trainer
    p = presets.get_preset("shapes_mask2former_cpu")
    assert (p.optimizer, p.lr, p.weight_decay, p.lr_multipliers, p.clip_grad) == ("adamw", 1e-4, 0.05,
                                                                                    {"backbone": 0.1}, 0.01)
    tiny = dict(width=16, conv_dim=32, mask_dim=32, enc_layers=1, enc_heads=4, enc_ffn=64, hidden_dim=32,
                num_queries=8, dec_heads=4, dec_ffn=64, dec_layers=3, train_num_points=256, min_size=64, max_size=64)
    p = presets.get_preset("shapes_mask2former_cpu", model=tiny, iters=16, batch_size=2, lr=1e-3, time_budget=0.0,
                           warmup_iters=2, milestones=(), hflip_prob=0.0, log_period=1000, eval_period=0,
                           checkpoint_period=0, cache_data=False)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run = str(tmp_path / "run")
        result = trainer.train(p, shapes2, run, device="cpu", seed=0, log=lambda *a, **k: None)
    finally:
        torch.set_num_threads(n)
    losses = [r["loss"] for r in result["losses"]]
    assert len(losses) == 16 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < 0.9 * sum(losses[:3]), losses
    assert set(result["eval"]) == {"bbox", "segm"} and -1 <= result["eval"]["segm"]["AP"] <= 1
    model, names, _ = checkpoint.model_from_checkpoint(os.path.join(run, "model_final.pth"))
    assert type(model).__name__ == "Mask2Former" and model.predictor.num_classes == len(names) == 6
