"""SAM (instseg_ops.models.sam) against the official segment_anything package and
transformers' SamModel with equal random weights: predictor masks, logits and IoU
predictions, raw decoder outputs, the automatic mask generator's set of masks; the
checkpoint layouts; bad input."""
import math

import numpy as np
import pytest
import torch

from instseg_ops.models import get_model, load_pretrained
from test_masks_ops import reference_label
from instseg_ops.models.sam import SamAutomaticMaskGenerator, SamPredictor, sam_state_dict_to_transformers
from instseg_ops.models.sam.model import TINY_CONFIG

sa = pytest.importorskip("segment_anything")


def official_sam(cfg=TINY_CONFIG, seed=0):
    """The official Sam built from its own classes with ``cfg``'s sizes, every parameter and
    buffer re-randomised (scales chosen so that logits and IoU predictions spread)."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
    grid = cfg["img_size"] // cfg["patch_size"]
    dim = cfg["prompt_embed_dim"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=cfg["encoder_depth"], embed_dim=cfg["encoder_embed_dim"], img_size=cfg["img_size"], mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=cfg["encoder_num_heads"],
            patch_size=cfg["patch_size"], qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=cfg["encoder_global_attn_indexes"], window_size=cfg["window_size"], out_chans=dim),
        prompt_encoder=PromptEncoder(embed_dim=dim, image_embedding_size=(grid, grid),
                                     input_image_size=(cfg["img_size"], cfg["img_size"]),
                                     mask_in_chans=cfg["mask_in_chans"]),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
            depth=cfg["decoder_depth"], embedding_dim=dim, mlp_dim=cfg["decoder_mlp_dim"],
            num_heads=cfg["decoder_num_heads"]), transformer_dim=dim, iou_head_depth=3,
            iou_head_hidden_dim=cfg["iou_head_hidden_dim"]),
        pixel_mean=[123.675, 116.28, 103.53], pixel_std=[58.395, 57.12, 57.375]).eval()
    randomise(sam, seed)
    return sam


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("positional_encoding_gaussian_matrix"):
                t.copy_(torch.randn(t.shape, generator=g))
            elif t.dim() == 1 and ("norm" in name or ".neck.1." in name or ".neck.3." in name
                                   or "output_upscaling.1" in name or "mask_downscaling.1" in name
                                   or "mask_downscaling.4" in name) and name.endswith("weight"):
                t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 16
                t.copy_(torch.randn(t.shape, generator=g) / math.sqrt(fan_in))
                if "output_hypernetworks_mlps" in name and ".layers.2." in name:
                    t.mul_(20)   # mask logits of a few units, so that stability scores spread
                    if name.endswith("bias"):
                        t.sub_(2)    # and masks of various sizes, many not touching the crop edges


def ours_from(official):
    ours = get_model("sam_vit_tiny") if official.image_encoder.img_size == 256 else get_model("sam_vit_b")
    result = load_pretrained(ours, official.state_dict())
    assert result.layout == "segment_anything"
    return ours.eval()


def rand_image(seed, h, w):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def pair():
    off = official_sam()
    return off, ours_from(off)


PROMPTS = [
    dict(point_coords=np.array([[40.0, 30.0]]), point_labels=np.array([1])),
    dict(point_coords=np.array([[40.0, 30.0], [100.5, 77.25], [5.0, 140.0]]), point_labels=np.array([1, 0, 1])),
    dict(box=np.array([10.0, 20.0, 150.0, 120.0])),
    dict(point_coords=np.array([[60.0, 50.0]]), point_labels=np.array([0]), box=np.array([10.0, 20.0, 150.0, 120.0])),
]


@pytest.mark.parametrize("size", [(150, 200), (256, 256), (300, 97)])
@pytest.mark.parametrize("multimask", [True, False])
def test_predictor_matches_official(pair, seed, size, multimask):
    off, ours = pair
    image = rand_image(seed, *size)
    p_off, p_ours = sa.SamPredictor(off), SamPredictor(ours)
    p_off.set_image(image)
    p_ours.set_image(image)
    torch.testing.assert_close(p_ours.get_image_embedding(), p_off.get_image_embedding(), atol=1e-5, rtol=1e-5)
    scale = np.array([size[1] / 200, size[0] / 150])
    for prompt in PROMPTS:
        prompt = dict(prompt)
        if "point_coords" in prompt:
            prompt["point_coords"] = prompt["point_coords"] * scale
        if "box" in prompt:
            prompt["box"] = prompt["box"] * np.concatenate([scale, scale])
        want = p_off.predict(**prompt, multimask_output=multimask, return_logits=True)
        got = p_ours.predict(**prompt, multimask_output=multimask, return_logits=True)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
        # the low-resolution logits as a mask prompt, and binary masks
        mask_input = want[2][np.argmax(want[1])][None]
        want_b = p_off.predict(**prompt, mask_input=mask_input, multimask_output=multimask)
        got_b = p_ours.predict(**prompt, mask_input=mask_input, multimask_output=multimask)
        np.testing.assert_allclose(got_b[1], want_b[1], atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(got_b[2], want_b[2], atol=1e-5, rtol=1e-5)
        logits = p_ours.predict(**prompt, mask_input=mask_input, multimask_output=multimask, return_logits=True)[0]
        sure = np.abs(logits) > 1e-4
        assert got_b[0].dtype == np.bool_ and np.array_equal(got_b[0][sure], want_b[0][sure])
        assert np.abs(logits).std() > 0.1   # the comparison is not of constants


def test_predict_torch_batched_matches_official(pair, seed):
    off, ours = pair
    image = rand_image(seed, 180, 240)
    p_off, p_ours = sa.SamPredictor(off), SamPredictor(ours)
    p_off.set_image(image, image_format="BGR")
    p_ours.set_image(image, image_format="BGR")
    g = torch.Generator().manual_seed(seed)
    pts = torch.rand(5, 2, 2, generator=g) * torch.tensor([240.0, 180.0])
    labels = torch.randint(0, 2, (5, 2), generator=g)
    boxes = torch.sort(torch.rand(5, 2, 2, generator=g), dim=1).values.reshape(5, 4) * torch.tensor([240.0, 180] * 2)
    for kw in [dict(point_coords=p_off.transform.apply_coords_torch(pts, (180, 240)), point_labels=labels),
               dict(point_coords=None, point_labels=None, boxes=p_off.transform.apply_boxes_torch(boxes, (180, 240))),
               dict(point_coords=p_off.transform.apply_coords_torch(pts, (180, 240)), point_labels=labels,
                    boxes=p_off.transform.apply_boxes_torch(boxes, (180, 240)))]:
        want = p_off.predict_torch(**kw, multimask_output=True, return_logits=True)
        got = p_ours.predict_torch(**kw, multimask_output=True, return_logits=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_model_forward_matches_official(pair, seed):
    off, ours = pair
    from segment_anything.utils.transforms import ResizeLongestSide
    tr = ResizeLongestSide(256)
    imgs = [rand_image(seed + i, *s) for i, s in enumerate([(120, 200), (256, 100)])]
    batch = []
    for img in imgs:
        x = torch.as_tensor(tr.apply_image(img)).permute(2, 0, 1).float()
        batch.append({"image": x, "original_size": img.shape[:2],
                      "point_coords": tr.apply_coords_torch(torch.tensor([[[30.0, 40.0]], [[80.0, 20.0]]]),
                                                            img.shape[:2]),
                      "point_labels": torch.ones(2, 1, dtype=torch.int)})
    with torch.no_grad():
        want, got = off(batch, multimask_output=True), ours(batch, multimask_output=True)
    for w, g in zip(want, got):
        torch.testing.assert_close(g["iou_predictions"], w["iou_predictions"], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(g["low_res_logits"], w["low_res_logits"], atol=1e-5, rtol=1e-5)


def test_layouts_round_trip(pair):
    off, ours = pair
    hf_sd = sam_state_dict_to_transformers(off.state_dict())
    fresh = get_model("sam_vit_tiny")
    result = load_pretrained(fresh, hf_sd)
    assert result.layout == "transformers_sam" and not result.missing_keys and not result.unexpected_keys
    for k, v in off.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    bad = dict(hf_sd)
    bad["shared_image_embedding.positional_embedding"] = bad["shared_image_embedding.positional_embedding"] + 1
    with pytest.raises(ValueError, match="positional"):
        load_pretrained(get_model("sam_vit_tiny"), bad)


def test_matches_transformers_sam_model(pair, seed):
    transformers = pytest.importorskip("transformers")
    from transformers.models.sam.configuration_sam import (
        SamConfig,
        SamMaskDecoderConfig,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )
    off, ours = pair
    c = TINY_CONFIG
    cfg = SamConfig(
        vision_config=SamVisionConfig(hidden_size=c["encoder_embed_dim"], num_hidden_layers=c["encoder_depth"],
                                      num_attention_heads=c["encoder_num_heads"],
                                      global_attn_indexes=list(c["encoder_global_attn_indexes"]),
                                      image_size=c["img_size"], patch_size=c["patch_size"],
                                      window_size=c["window_size"], output_channels=c["prompt_embed_dim"],
                                      num_pos_feats=c["prompt_embed_dim"] // 2).to_dict(),
        prompt_encoder_config=SamPromptEncoderConfig(hidden_size=c["prompt_embed_dim"], image_size=c["img_size"],
                                                     patch_size=c["patch_size"],
                                                     mask_input_channels=c["mask_in_chans"]).to_dict(),
        mask_decoder_config=SamMaskDecoderConfig(hidden_size=c["prompt_embed_dim"], mlp_dim=c["decoder_mlp_dim"],
                                                 num_attention_heads=c["decoder_num_heads"],
                                                 iou_head_hidden_dim=c["iou_head_hidden_dim"],
                                                 # the official two-way blocks' LayerNorms use torch's
                                                 # default eps; transformers' default (1e-6) differs
                                                 layer_norm_eps=1e-5).to_dict())
    hf = transformers.SamModel(cfg).eval()
    result = hf.load_state_dict(sam_state_dict_to_transformers(ours.state_dict()), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    g = torch.Generator().manual_seed(seed)
    x = ours.preprocess(torch.randint(0, 256, (1, 3, 256, 200), generator=g).float())
    pts = torch.rand(1, 4, 3, 2, generator=g) * 200   # 4 prompts of 3 points each
    labels = torch.randint(0, 2, (1, 4, 3), generator=g)
    boxes = torch.tensor([[[10.0, 20.0, 180.0, 150.0], [0.0, 0.0, 60.0, 200.0]]])
    with torch.no_grad():
        emb = ours.image_encoder(x)
        pe = ours.prompt_encoder.get_dense_pe()
        for multimask in (True, False):
            sparse, dense = ours.prompt_encoder((pts[0], labels[0]), None, None)
            m, iou = ours.mask_decoder(emb, pe, sparse, dense, multimask)
            out = hf(pixel_values=x, input_points=pts, input_labels=labels, multimask_output=multimask)
            # transformers orders some float operations differently (the scaling of the attention
            # logits, fused attention): equal to 1e-5 of the logits' scale (a few tens here)
            torch.testing.assert_close(out.pred_masks[0], m, atol=1e-5 * m.abs().max().item(), rtol=1e-5)
            torch.testing.assert_close(out.iou_scores[0], iou, atol=1e-5, rtol=1e-5)
            sparse, dense = ours.prompt_encoder(None, boxes[0], None)
            m, iou = ours.mask_decoder(emb, pe, sparse, dense, multimask)
            out = hf(image_embeddings=emb, input_boxes=boxes, multimask_output=multimask)
            # transformers orders some float operations differently (the scaling of the attention
            # logits, fused attention): equal to 1e-5 of the logits' scale (a few tens here)
            torch.testing.assert_close(out.pred_masks[0], m, atol=1e-5 * m.abs().max().item(), rtol=1e-5)
            torch.testing.assert_close(out.iou_scores[0], iou, atol=1e-5, rtol=1e-5)


# --- automatic mask generator ---------------------------------------------------------------

class FakeCv2:
    """Stands in for OpenCV (not installed) in the official generator's small-region cleanup:
    ``connectedComponentsWithStats`` from the plain-Python reference above."""

    @staticmethod
    def connectedComponentsWithStats(image, connectivity):
        labels, areas = reference_label(image.astype(bool), connectivity)
        stats = np.zeros((len(areas) + 1, 5), dtype=np.int32)
        stats[0, 4] = int((labels == 0).sum())
        stats[1:, 4] = areas
        return len(areas) + 1, labels, stats, None


def amg_pair(pair, seed, image, **kw):
    """Thresholds suited to the random weights: the IoU threshold at the median predicted IoU of
    the grid's points, the stability threshold low enough that some masks pass and some do not."""
    off, ours = pair
    p = sa.SamPredictor(off)
    p.set_image(image)
    grid = sa.automatic_mask_generator.build_point_grids(kw.get("points_per_side", 8), 0, 1)[0] \
        if hasattr(sa.automatic_mask_generator, "build_point_grids") else None
    if grid is None:
        from segment_anything.utils.amg import build_point_grid
        grid = build_point_grid(kw.get("points_per_side", 8))
    pts = grid * np.array(image.shape[:2])[None, ::-1]
    _, iou, _ = p.predict_torch(torch.as_tensor(p.transform.apply_coords(pts, image.shape[:2]))[:, None],
                                torch.ones(len(pts), 1, dtype=torch.int), multimask_output=True)
    kw.setdefault("pred_iou_thresh", float(iou.median()))
    kw.setdefault("stability_score_thresh", 0.7)
    return (sa.SamAutomaticMaskGenerator(off, **kw), SamAutomaticMaskGenerator(ours, **kw))


def compare_anns(got, want, pixels):
    key = lambda a: (tuple(a["crop_box"]), tuple(a["point_coords"][0]), round(a["predicted_iou"], 4))  # noqa: E731
    got, want = sorted(got, key=key), sorted(want, key=key)
    assert len(got) == len(want) and len(want) > 0
    for g, w in zip(got, want):
        assert set(g) == set(w)
        assert g["crop_box"] == w["crop_box"]
        np.testing.assert_allclose(g["point_coords"], w["point_coords"], rtol=0, atol=1e-9)
        assert abs(g["predicted_iou"] - w["predicted_iou"]) < 1e-5
        # a pixel whose logit is within float rounding of threshold +- offset may count differently
        assert abs(g["stability_score"] - w["stability_score"]) <= 1e-6 + pixels / max(1, w["area"])
        assert type(g["area"]) is type(w["area"]) and abs(g["area"] - w["area"]) <= pixels
        assert np.abs(np.array(g["bbox"]) - np.array(w["bbox"])).max() <= (0 if pixels == 0 else 1)
        # (the official crop boxes turn to floats when a crop keeps no mask: ours stay ints)
        assert all(type(x) is type(y) is int for x, y in zip(g["bbox"], w["bbox"]))
        yield g, w


# A random model's masks are scattered blobs whose boxes span the whole image (or crop), so
# box NMS at the default thresholds keeps one of them: the first test compares every mask that
# passes the filters (NMS thresholds 1.0 suppress nothing), the second the defaults' NMS.
@pytest.mark.parametrize("nms", ["off", "default"])
def test_amg_matches_official(pair, seed, nms):
    image = rand_image(seed, 96, 128)
    kw = dict(box_nms_thresh=1.0, crop_nms_thresh=1.0) if nms == "off" else dict(box_nms_thresh=0.7)
    off, ours = amg_pair(pair, seed, image, points_per_side=8, crop_n_layers=1, points_per_batch=20,
                         crop_n_points_downscale_factor=2, **kw)
    want, got = off.generate(image), ours.generate(image)
    print(f"{len(want)} masks")
    for g, w in compare_anns(got, want, pixels=2):
        assert g["segmentation"].dtype == np.bool_ and g["segmentation"].shape == (96, 128)
        assert (g["segmentation"] != w["segmentation"]).sum() <= 2   # logits within 1e-5 of the threshold
    if nms == "off":
        assert len(want) > 10


@pytest.mark.parametrize("mode", ["uncompressed_rle", "coco_rle"])
def test_amg_output_modes_match_official(pair, seed, mode):
    image = rand_image(seed, 80, 64)
    off, ours = amg_pair(pair, seed, image, points_per_side=6, output_mode=mode, box_nms_thresh=1.0)
    for g, w in compare_anns(ours.generate(image), off.generate(image), pixels=2):
        assert g["segmentation"]["size"] == w["segmentation"]["size"]
        if mode == "coco_rle":
            from pycocotools import mask as mask_utils
            gm, wm = mask_utils.decode(g["segmentation"]), mask_utils.decode(w["segmentation"])
            assert isinstance(g["segmentation"]["counts"], str) and (gm != wm).sum() <= 2
        elif g["area"] == w["area"]:
            assert g["segmentation"]["counts"] == w["segmentation"]["counts"]


def test_amg_min_mask_region_area_matches_official(pair, seed, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "cv2", FakeCv2)
    image = rand_image(seed, 72, 90)
    off, ours = amg_pair(pair, seed, image, points_per_side=6, min_mask_region_area=40, box_nms_thresh=1.0)
    want, got = off.generate(image), ours.generate(image)
    for g, w in compare_anns(got, want, pixels=2):
        assert (g["segmentation"] != w["segmentation"]).sum() <= 2


def test_amg_bad_input(pair):
    _, ours = pair
    with pytest.raises(ValueError, match="Exactly one"):
        SamAutomaticMaskGenerator(ours, points_per_side=None)
    with pytest.raises(ValueError, match="output_mode"):
        SamAutomaticMaskGenerator(ours, output_mode="png")
    gen = SamAutomaticMaskGenerator(ours, points_per_side=4)
    with pytest.raises(ValueError, match="uint8"):
        gen.generate(np.zeros((40, 40, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="H, W, 3"):
        gen.generate(np.zeros((3, 40, 40), dtype=np.uint8))
    # nothing passes: an empty list
    assert SamAutomaticMaskGenerator(ours, points_per_side=4, pred_iou_thresh=1e9).generate(
        np.zeros((40, 50, 3), dtype=np.uint8)) == []


def test_predictor_bad_input(pair):
    _, ours = pair
    p = SamPredictor(ours)
    with pytest.raises(RuntimeError, match="set_image"):
        p.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="H, W, 3"):
        p.set_image(np.zeros((3, 40, 50), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        p.set_image(np.zeros((40, 50, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="RGB"):
        p.set_image(np.zeros((40, 50, 3), dtype=np.uint8), image_format="HSV")
    with pytest.raises(ValueError, match="empty"):
        p.set_image(np.zeros((0, 50, 3), dtype=np.uint8))
    p.set_image(np.zeros((40, 50, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="outside"):
        p.predict(point_coords=np.array([[51.0, 10.0]]), point_labels=np.array([1]))
    with pytest.raises(ValueError, match="outside"):
        p.predict(box=np.array([-5.0, 0.0, 10.0, 10.0]))
    with pytest.raises(ValueError, match="x1 <= x2"):
        p.predict(box=np.array([20.0, 0.0, 10.0, 10.0]))
    with pytest.raises(ValueError, match="point_labels"):
        p.predict(point_coords=np.array([[1.0, 1.0]]))
    with pytest.raises(ValueError, match="point_labels"):
        p.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1, 1]))
    with pytest.raises(ValueError, match="mask_input"):
        p.predict(point_coords=np.array([[1.0, 1.0]]), point_labels=np.array([1]), mask_input=np.zeros((1, 32, 32)))
    with pytest.raises(ValueError, match="no prompt"):
        p.predict()
    # edges are inside, any image size works
    masks, iou, low = p.predict(point_coords=np.array([[50.0, 40.0], [0.0, 0.0]]), point_labels=np.array([1, 0]))
    assert masks.shape == (3, 40, 50) and iou.shape == (3,) and low.shape == (3, 64, 64)
    p.set_image(np.zeros((1, 700, 3), dtype=np.uint8))
    assert p.predict(box=np.array([0.0, 0.0, 700.0, 1.0]), multimask_output=False)[0].shape == (1, 1, 700)


@pytest.mark.parametrize("chunk", [None, 1 << 12])
def test_image_encoder_is_bitwise_the_official(pair, seed, chunk, monkeypatch):
    """Same operations in the same order (relative positions added in place, logits chunked
    over heads): the same bits, windowed and global blocks, with or without chunking."""
    off, ours = pair
    if chunk is not None:
        from instseg_ops.models.sam.image_encoder import Attention
        monkeypatch.setattr(Attention, "chunk_elements", chunk)
    x = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(seed)) * 50
    with torch.no_grad():
        assert torch.equal(ours.image_encoder(x), off.image_encoder(x))


@pytest.mark.slow
def test_vit_b_predictor_matches_official(seed):
    off = sa.sam_model_registry["vit_b"]()
    randomise(off, seed)
    ours = ours_from(off)
    image = rand_image(seed, 300, 400)
    p_off, p_ours = sa.SamPredictor(off), SamPredictor(ours)
    p_off.set_image(image)
    p_ours.set_image(image)
    torch.testing.assert_close(p_ours.get_image_embedding(), p_off.get_image_embedding(), atol=1e-5, rtol=1e-5)
    for prompt in PROMPTS:
        want = p_off.predict(**prompt, return_logits=True)
        got = p_ours.predict(**prompt, return_logits=True)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["holes", "islands"])
def test_remove_small_regions_matches_official(seed, monkeypatch, mode):
    import sys

    from segment_anything.utils.amg import remove_small_regions as official

    from instseg_ops.models.sam.amg import remove_small_regions
    from test_masks_ops import random_masks
    monkeypatch.setitem(sys.modules, "cv2", FakeCv2)
    gen = torch.Generator().manual_seed(seed)
    changed_any = False
    for m in random_masks(gen, 8, 37, 29).bool():
        for thresh in (3, 20, 1000):
            want, want_changed = official(m.numpy(), thresh, mode)
            got, got_changed = remove_small_regions(m, thresh, mode)
            assert got_changed == want_changed and np.array_equal(got.numpy(), want)
            changed_any |= want_changed
    assert changed_any


def test_training_losses_decrease(seed):
    """A few Adam steps of the tiny model on one image with two shapes lower the losses."""
    torch.manual_seed(seed)
    model = get_model("sam_vit_tiny").train()
    img = torch.full((3, 96, 128), 0.2)
    masks = torch.zeros(2, 96, 128, dtype=torch.uint8)
    masks[0, 10:50, 20:70] = 1
    yy, xx = torch.meshgrid(torch.arange(96), torch.arange(128), indexing="ij")
    masks[1] = ((yy - 65) ** 2 + (xx - 95) ** 2 < 20 ** 2).to(torch.uint8)
    img[0][masks[0].bool()] = 0.9
    img[1][masks[1].bool()] = 0.7
    boxes = torch.tensor([[20.0, 10.0, 70.0, 50.0], [75.0, 45.0, 115.0, 85.0]])
    targets = [{"masks": masks, "boxes": boxes, "labels": torch.ones(2, dtype=torch.long)}]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(12):
        losses = model([img], targets)
        assert set(losses) == {"loss_focal", "loss_dice", "loss_iou"}
        total = sum(losses.values())
        assert torch.isfinite(total)
        first = float(total) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(sum(model([img], targets).values())) < 0.8 * first
    empty = [{"masks": torch.zeros(0, 96, 128, dtype=torch.uint8), "boxes": torch.zeros(0, 4),
              "labels": torch.zeros(0, dtype=torch.long)}]
    assert float(sum(model([img], empty).values())) == 0.0
