"""``FactoredMaskDecoder`` (the mask generator's decoder: image-side work shared across
prompts, low-rank per-prompt updates) against the plain ``MaskDecoder`` (itself equal to the
official one, test_sam.py) on random weights of several sizes, and the mask generator's
factored path against its exact path and the official generator."""
import numpy as np
import pytest
import torch

from instseg_ops.models import get_model
from instseg_ops.models.sam import SamAutomaticMaskGenerator
from instseg_ops.models.sam.factored_decoder import FactoredMaskDecoder
from instseg_ops.models.sam.model import TINY_CONFIG
from test_sam import amg_pair, compare_anns, pair, rand_image, randomise  # noqa: F401  (pair: fixture)

SIZES = {
    "tiny": {},
    # the official decoder's width and heads (256, 8) on a small grid
    "wide": dict(prompt_embed_dim=256, decoder_num_heads=8, decoder_mlp_dim=512, iou_head_hidden_dim=64,
                 img_size=192, window_size=6),
    # other depths than the official 2 (the unrolled LayerNorm chain of any length)
    "depth1": dict(decoder_depth=1),
    "depth3": dict(decoder_depth=3, img_size=128, window_size=4),
}


def _decoder_inputs(model, gen, prompts):
    pe = model.prompt_encoder
    size = pe.input_image_size[0]
    emb = torch.randn((1, pe.embed_dim) + tuple(pe.image_embedding_size), generator=gen)
    if prompts == "points":
        coords = torch.rand(11, 3, 2, generator=gen) * size
        labels = torch.randint(0, 2, (11, 3), generator=gen)
        sparse, dense = pe((coords, labels), None, None)
    else:
        boxes = torch.sort(torch.rand(11, 2, 2, generator=gen), dim=1).values.reshape(11, 4) * size
        sparse, dense = pe(None, boxes, None)
    return emb, sparse, dense


@pytest.mark.parametrize("size", sorted(SIZES))
@pytest.mark.parametrize("prompts", ["points", "boxes"])
def test_factored_decoder_matches_plain(seed, size, prompts):
    model = get_model("sam_vit_tiny", **{**TINY_CONFIG, **SIZES[size]}).eval()
    randomise(model, seed)
    gen = torch.Generator().manual_seed(seed)
    emb, sparse, dense = _decoder_inputs(model, gen, prompts)
    dec, pe = model.mask_decoder, model.prompt_encoder
    fd = FactoredMaskDecoder(dec, emb, pe.get_dense_pe(), pe.no_mask_embed.weight.reshape(1, -1, 1, 1), chunk=4)
    with torch.no_grad():
        for multimask in (True, False):
            want_m, want_iou = dec(emb, pe.get_dense_pe(), sparse, dense, multimask)
            got_m, got_iou = fd(sparse, multimask_output=multimask)
            assert got_m.shape == want_m.shape and got_iou.shape == want_iou.shape
            scale = want_m.abs().max().item()
            assert want_m.std() > 0.1 and want_iou.std() > 1e-3   # not a comparison of constants
            # float rounding differs (the algebra is exact): relative 1e-6 observed
            torch.testing.assert_close(got_m, want_m, atol=1e-5 * scale, rtol=0)
            torch.testing.assert_close(got_iou, want_iou, atol=1e-5, rtol=0)
            # with an IoU threshold: exactly the masks above it, (prompt, mask) order
            thr = float(want_iou.median())
            kept_m, kept_iou = fd(sparse, multimask_output=multimask, iou_threshold=thr)
            torch.testing.assert_close(kept_iou, got_iou, atol=0, rtol=0)
            keep = got_iou > thr
            assert 0 < int(keep.sum()) < keep.numel()
            torch.testing.assert_close(kept_m, got_m[keep], atol=1e-5 * scale, rtol=0)


def test_factored_decoder_edges(seed):
    model = get_model("sam_vit_tiny").eval()
    randomise(model, seed)
    gen = torch.Generator().manual_seed(seed)
    emb, sparse, dense = _decoder_inputs(model, gen, "points")
    pe = model.prompt_encoder
    fd = FactoredMaskDecoder(model.mask_decoder, emb, pe.get_dense_pe(), pe.no_mask_embed.weight.reshape(1, -1, 1, 1))
    m, iou = fd(sparse[:0])
    assert m.shape == (0, 3, 64, 64) and iou.shape == (0, 3)
    m, iou = fd(sparse, iou_threshold=1e9)   # nothing passes: no mask computed
    assert m.shape == (0, 64, 64) and iou.shape == (11, 3)
    with pytest.raises(ValueError, match="sparse"):
        fd(sparse[0])
    with pytest.raises(ValueError, match="one image embedding"):
        FactoredMaskDecoder(model.mask_decoder, emb.expand(2, -1, -1, -1), pe.get_dense_pe(), dense[:1])
    with pytest.raises(ValueError, match="chunk"):
        FactoredMaskDecoder(model.mask_decoder, emb, pe.get_dense_pe(), dense[:1], chunk=0)


def test_amg_factored_vs_exact_vs_official(pair, seed):  # noqa: F811
    """The generator's factored path (default), its exact path (the plain decoder) and the
    official generator give the same set of masks (a pixel whose logit lies within float
    rounding of the threshold may differ)."""
    image = rand_image(seed, 90, 120)
    kw = dict(points_per_side=8, crop_n_layers=1, points_per_batch=24, crop_n_points_downscale_factor=2,
              box_nms_thresh=1.0, crop_nms_thresh=1.0)
    off, fast = amg_pair(pair, seed, image, **kw)
    exact = SamAutomaticMaskGenerator(pair[1], **{**kw, "pred_iou_thresh": fast.pred_iou_thresh,
                                                  "stability_score_thresh": fast.stability_score_thresh},
                                      exact_decoder=True)
    want, got_fast, got_exact = off.generate(image), fast.generate(image), exact.generate(image)
    assert len(want) > 10
    for g, w in compare_anns(got_exact, want, pixels=2):
        assert (g["segmentation"] != w["segmentation"]).sum() <= 2
    for g, w in compare_anns(got_fast, got_exact, pixels=2):
        assert (g["segmentation"] != w["segmentation"]).sum() <= 2
    differing = sum(int((g["segmentation"] != w["segmentation"]).sum())
                    for g, w in zip(*[sorted(x, key=lambda a: (a["crop_box"], a["point_coords"], a["area"]))
                                      for x in (got_fast, got_exact)]))
    print(f"{len(want)} masks; factored vs exact: {differing} pixels differ")
    # an empty grid
    assert SamAutomaticMaskGenerator(pair[1], points_per_side=None, point_grids=[np.zeros((0, 2))]).generate(image) == []
