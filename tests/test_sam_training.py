"""SAM training: the corrective-point sampler, the iterative losses, the prompted mIoU
evaluation (against the predictor and a brute-force interior point) and the preset's trainer
run (tiny sizes; the recorded 30-minute run is in benchmarks/RESULTS.md)."""
import json
import os

import numpy as np
import pytest
import torch

from instseg_ops.models import get_model, load_pretrained
from instseg_ops.models.data import generate_split
from instseg_ops.models.sam import SamPredictor
from instseg_ops.models.sam import training as sam_training
from instseg_ops.models.sam.evaluate import evaluate_prompts, interior_points, mask_iou
from instseg_ops.models.sam.training import interaction_schedule, sam_losses, sample_error_points


pytestmark = pytest.mark.usefixtures("one_thread")


def small_sam(seed, **kw):
    """The preset's model at 64 px input with 8-px patches (8x8 embedding, one window, 32x32
    logits), random weights."""
    torch.manual_seed(seed)
    return get_model("sam_tiny_shapes", img_size=64, patch_size=8, **kw)


def disc_and_box(h, w, seed):
    """An image (floats in [0, 1]) with a disc and a rectangle, their masks and boxes."""
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(3, h, w, generator=g) * 0.2
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    cy, cx, r = h // 3, w // 3, max(3, min(h, w) // 6)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    rect = torch.zeros(h, w, dtype=torch.bool)
    rect[h // 2:h - 4, w // 2:w - 6] = True
    img[:, disc] += 0.7
    img[0, rect] += 0.5
    masks = torch.stack([disc, rect & ~disc]).to(torch.uint8)
    boxes = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
    return img.clamp(0, 1), {"masks": masks, "boxes": torch.tensor(boxes), "labels": torch.ones(2, dtype=torch.long)}


# ------------------------------------------------------------------------------- point sampler

def test_sample_error_points_in_the_error_region_with_the_right_labels(seed):
    g = torch.Generator().manual_seed(seed)
    k, h, w = 6, 11, 13
    pred = torch.rand(k, h, w, generator=g) < 0.4
    gt = torch.rand(k, h, w, generator=g) < 0.5
    gt[4] = pred[4]                          # no error at all
    valid = torch.zeros(h, w, dtype=torch.bool)
    valid[:9, :10] = True                    # e.g. the unpadded image
    gt[5] = pred[5]
    gt[5, 10, 12] = ~pred[5, 10, 12]         # its only error lies outside the valid region
    err = (pred != gt) & valid
    counts = torch.zeros(k, h, w)
    for _ in range(300):
        coords, labels = sample_error_points(pred, gt, valid, generator=g)
        assert coords.shape == (k, 2) and labels.shape == (k,) and labels.dtype == torch.long
        for j in range(k):
            if not err[j].any():
                assert labels[j] == -1 and coords[j].tolist() == [0.0, 0.0]
                continue
            x, y = (int(v) for v in coords[j])
            assert coords[j].tolist() == [float(x), float(y)]
            assert err[j, y, x], (j, x, y)
            # positive on a false negative (object missed), negative on a false positive
            assert labels[j] == (1 if gt[j, y, x] else 0)
            assert gt[j, y, x] != pred[j, y, x]
            counts[j, y, x] += 1
    # uniform over the error region: each mask's share of positive clicks follows its
    # false-negative fraction (300 draws: a binomial standard deviation of at most 0.03)
    for j in range(4):
        fn = (err[j] & gt[j]).sum() / err[j].sum()
        share = counts[j][gt[j]].sum() / counts[j].sum()
        assert abs(float(share - fn)) < 0.12, (j, float(share), float(fn))
        assert (counts[j] > 0).sum() >= min(int(err[j].sum()), 20)
    # no valid region: the whole image
    coords, labels = sample_error_points(pred[:1], ~pred[:1])
    assert labels.item() in (0, 1)
    with pytest.raises(ValueError, match="one shape"):
        sample_error_points(pred, gt[:, :5])
    c, lab = sample_error_points(pred[:0], gt[:0])
    assert c.shape == (0, 2) and lab.shape == (0,)


def test_interaction_schedule(seed):
    g = torch.Generator().manual_seed(seed)
    for points, masks in ((0, 0), (2, 1), (8, 2), (3, 4)):
        s = interaction_schedule(points, masks, g)
        assert s.count(True) == points and s.count(False) == masks
        if masks:
            assert s[-1] is False
    with pytest.raises(ValueError):
        interaction_schedule(-1, 0)


# --------------------------------------------------------------------------------- the losses

@pytest.mark.parametrize("box_prob", [0.0, 1.0])
def test_iterative_prompts_feed_back_points_and_masks(seed, monkeypatch, box_prob):
    """Each iteration after the first adds one corrective point per instance (none in the
    mask-only iterations), negative where the previous mask is foreground and positive where
    it is not, and feeds back the previous prediction's logits: after a first point the
    multimask output with the highest predicted IoU, after a box the single output, later
    the single output."""
    model = small_sam(seed).train()
    img, tgt = disc_and_box(64, 64, seed)
    img2, tgt2 = disc_and_box(48, 64, seed + 1)
    calls, decoded = [], []
    enc, dec = model.prompt_encoder.forward, model.mask_decoder.predict_masks

    def record_prompts(points, boxes, masks):
        calls.append((None if points is None else (points[0].clone(), points[1].clone()),
                      boxes is not None, None if masks is None else masks.detach().clone()))
        return enc(points, boxes, masks)

    def record_decoder(*args):
        out = dec(*args)
        decoded.append((out[0].detach().clone(), out[1].detach().clone()))
        return out

    monkeypatch.setattr(model.prompt_encoder, "forward", record_prompts)
    monkeypatch.setattr(model.mask_decoder, "predict_masks", record_decoder)
    point_iters, mask_iters = 3, 2
    losses = sam_losses(model, [img, img2], [tgt, tgt2], box_prob=box_prob, point_iters=point_iters,
                        mask_iters=mask_iters, generator=torch.Generator().manual_seed(seed))
    assert set(losses) == {"loss_focal", "loss_dice", "loss_iou"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    # the schedule draws come after the first prompt's: rebuild it from the recorded calls
    assert len(decoded) == len(calls) == 1 + point_iters + mask_iters
    k = decoded[0][0].shape[0]
    assert k == 4
    n_points = 0
    for t, (points, is_box, masks) in enumerate(calls):
        assert is_box == (box_prob == 1.0)
        assert (masks is None) == (t == 0)
        have = 0 if points is None else points[0].shape[1]
        first = 0 if is_box else 1
        if t > 0:
            assert have - first in (n_points, n_points + 1)
            added = have - first == n_points + 1
            n_points = have - first
        if t == 0:
            assert have == first
            if not is_box:
                assert (points[1][:, 0] == 1).all()          # the first click is positive
            continue
        prev_masks, prev_iou = decoded[t - 1]
        if t == 1 and not is_box:
            want = prev_masks[:, 1:][torch.arange(k), prev_iou[:, 1:].argmax(1)]
        else:
            want = prev_masks[:, 0]
        assert torch.equal(masks[:, 0], want)
        if added:
            # the new click: a low-resolution cell centre (2 input pixels per cell here) where
            # the previous prediction was wrong: negative on its foreground, positive elsewhere
            xy, lab = points[0][:, -1], points[1][:, -1]
            for j in range(k):
                if lab[j] == -1:
                    continue
                cx, cy = (float(v - 0.5) / 2 for v in xy[j])
                assert cx == int(cx) and cy == int(cy)
                fg = bool(want[j, int(cy), int(cx)] > 0)
                assert int(lab[j]) == (0 if fg else 1)
    assert n_points == point_iters


def test_losses_train_the_model_and_ignore_empty_targets(seed):
    model = small_sam(seed).train()
    img, tgt = disc_and_box(64, 64, seed)
    empty = {"masks": torch.zeros(0, 64, 64, dtype=torch.uint8), "boxes": torch.zeros(0, 4),
             "labels": torch.zeros(0, dtype=torch.long)}
    blank = {"masks": torch.zeros(2, 64, 64, dtype=torch.uint8), "boxes": torch.tensor([[1.0, 1, 5, 5]] * 2),
             "labels": torch.ones(2, dtype=torch.long)}
    # images whose targets are empty (or all-empty masks) give zero losses that back-propagate
    zero = model([img, img], [empty, blank])
    assert all(float(v.detach()) == 0.0 for v in zero.values())
    sum(zero.values()).backward()
    # a mixed batch equals the losses of its non-empty image alone (same random draws)
    a = sam_losses(model, [img], [tgt], generator=torch.Generator().manual_seed(1))
    b = sam_losses(model, [img, img], [tgt, empty], generator=torch.Generator().manual_seed(1))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        losses = model([img], [tgt])
        total = sum(losses.values())
        first = float(total) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(sum(model([img], [tgt]).values())) < 0.7 * first
    with pytest.raises(ValueError, match="images but"):
        model([img], [tgt, tgt])


def test_full_res_loss_scores_the_upsampled_logits(seed):
    from instseg_ops.models.sam.training import _mask_stats
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 3, 16, 16, generator=g) * 4
    up = torch.nn.functional.interpolate(logits, (64, 64), mode="bilinear", align_corners=False)
    # the ground truth at the input size is what the upsampled logits say for output 0
    target = (up[:, :1] > 0).float()
    focal, dice, iou = _mask_stats(logits, target, 20.0)
    assert focal.shape == dice.shape == iou.shape == (5, 3)
    assert torch.equal(iou[:, 0], torch.ones(5))
    assert (iou[:, 1:] < 1).all()
    _, _, iou_neg = _mask_stats(-logits, target, 20.0)
    assert torch.equal(iou_neg[:, 0], torch.zeros(5))
    # at the low resolution (same size) nothing is upsampled
    low_target = (logits[:, :1] > 0).float()
    assert torch.equal(_mask_stats(logits, low_target, 20.0)[2][:, 0], torch.ones(5))
    # and the preset's model trains with it
    model = small_sam(seed, full_res_loss=True).train()
    img, tgt = disc_and_box(64, 64, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(15):
        total = sum(model([img], [tgt]).values())
        first = float(total) if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert float(sum(model([img], [tgt]).values())) < 0.7 * first


def test_trainable_sam_keeps_the_official_layout(seed):
    model = small_sam(seed, point_iters=1)
    assert model.train_options == {"point_iters": 1}
    plain = get_model("sam_vit_tiny", img_size=64, patch_size=8, window_size=8)
    assert load_pretrained(plain, model.state_dict()).layout == "segment_anything"
    assert set(plain.state_dict()) == set(model.state_dict())


# ------------------------------------------------------------------------------ the evaluation

def brute_force_interior_point(mask: np.ndarray):
    """The pixel farthest (Euclidean) from every background pixel, the ring outside the image
    included; the first in row-major order among equals."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), bool)
    padded[1:-1, 1:-1] = mask
    by, bx = np.nonzero(~padded)
    best, where = -1.0, None
    for y in range(h):
        for x in range(w):
            if mask[y, x]:
                d = np.sqrt(((by - (y + 1)) ** 2 + (bx - (x + 1)) ** 2).min())
                if d > best + 1e-9:
                    best, where = d, (x, y)
    return where


def test_interior_points_are_the_distance_maxima(seed):
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(5, 9, 12, generator=g) < 0.7
    masks[3] = False
    masks[4] = True                                 # touches every border
    got = interior_points(masks)
    for m, p in zip(masks.numpy(), got.tolist()):
        if not m.any():
            assert p == [-1.0, -1.0]
        else:
            assert tuple(int(v) for v in p) == brute_force_interior_point(m)
            assert m[int(p[1]), int(p[0])]


def test_prompt_miou_matches_the_predictor(seed):
    """evaluate_prompts against segment-anything's predictor API used plainly: box prompts
    with multimask_output=False, a point with the best of three by predicted IoU, IoUs in
    numpy, the interior point by brute force."""
    model = small_sam(seed)
    # prompts whose masks are not all empty or full: a decoder bias so logits straddle 0
    data = []
    for i, (h, w) in enumerate([(64, 64), (64, 48), (64, 64)]):
        img, tgt = disc_and_box(h, w, seed + i)
        data.append(((img * 255).round(), tgt))     # integer pixel values: the same input both ways
    empty = {"masks": torch.zeros(0, 64, 64, dtype=torch.uint8), "boxes": torch.zeros(0, 4),
             "labels": torch.zeros(0, dtype=torch.long)}
    data.append((data[0][0], empty))
    result = evaluate_prompts(model, data, batch_size=1)
    predictor = SamPredictor(model)
    box_ious, point_ious, oracle, areas = [], [], [], []
    for img, tgt in data:
        predictor.set_image(img.permute(1, 2, 0).numpy().astype(np.uint8))
        for m, b in zip(tgt["masks"].numpy().astype(bool), tgt["boxes"].numpy()):
            def iou(p):
                return (p & m).sum() / (p | m).sum()
            masks, _, _ = predictor.predict(box=b, multimask_output=False)
            box_ious.append(iou(masks[0]))
            x, y = brute_force_interior_point(m)
            masks, scores, _ = predictor.predict(point_coords=np.array([[x, y]], float),
                                                 point_labels=np.array([1]), multimask_output=True)
            ious = [iou(p) for p in masks]
            point_ious.append(ious[int(np.argmax(scores))])
            oracle.append(max(ious))
            areas.append(m.sum())
    assert result["counts"]["instances"] == len(box_ious) == 6 and result["counts"]["images"] == 4
    assert result["box_mIoU"] == pytest.approx(np.mean(box_ious), abs=1e-9)
    assert result["point_mIoU"] == pytest.approx(np.mean(point_ious), abs=1e-9)
    assert result["point_oracle_mIoU"] == pytest.approx(np.mean(oracle), abs=1e-9)
    small = [v for v, a in zip(box_ious, areas) if a < 32 ** 2]
    assert result["counts"]["small"] == len(small)
    if small:
        assert result["box_mIoU_small"] == pytest.approx(np.mean(small), abs=1e-9)
    # batched images: the same up to float rounding in the encoder
    batched = evaluate_prompts(model, data, batch_size=3)
    assert batched["counts"] == result["counts"]
    assert abs(batched["box_mIoU"] - result["box_mIoU"]) < 0.05
    # no instances at all
    none = evaluate_prompts(model, [(data[0][0], empty)])
    assert none["counts"]["instances"] == 0 and none["box_mIoU"] == 0.0
    # the model's mode is restored
    model.train()
    evaluate_prompts(model, data[:1])
    assert model.training


def test_mask_iou(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(4, 7, 9, generator=g) < 0.5
    b = torch.rand(4, 7, 9, generator=g) < 0.5
    b[3] = False
    a[3] = False
    got = mask_iou(a, b)
    for j in range(3):
        an, bn = a[j].numpy(), b[j].numpy()
        assert float(got[j]) == pytest.approx((an & bn).sum() / (an | bn).sum())
    assert float(got[3]) == 1.0


# ---------------------------------------------------------------------------- the preset's run

@pytest.fixture(scope="module")
def tiny_shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("sam_shapes")
    generate_split(str(root), "train", 4, size=64, seed=3, max_objects=3)
    generate_split(str(root), "val", 2, size=64, seed=4, max_objects=3)
    return str(root)


def test_preset_trains_and_reports_prompted_miou(tiny_shapes, tmp_path):
    from instseg_ops.models import evaluate as generic_evaluate
    from instseg_ops.models.engine.presets import PRESETS, get_preset
    from instseg_ops.models.engine.trainer import train
    from instseg_ops.models.sam import evaluate as sam_evaluate

    preset = PRESETS["shapes_sam_tiny_cpu"]
    assert preset.arch == "sam_tiny_shapes" and preset.time_budget == 29.0
    model = sam_training.sam_tiny_shapes(**preset.model)
    assert model.image_encoder.img_size == 256 and model.prompt_encoder.mask_input_size == (64, 64)
    assert model.train_options["point_iters"] >= 1 and model.train_options["mask_iters"] >= 1

    # 2 iterations at a 64-px input (the preset's model otherwise)
    p = get_preset("shapes_sam_tiny_cpu", iters=2, time_budget=0, batch_size=2, checkpoint_period=0, log_period=1,
                   model={"img_size": 64})
    out = str(tmp_path / "run")
    result = train(p, tiny_shapes, out, log=lambda *a, **k: None)
    assert result["iteration"] == 2 and len(result["losses"]) == 2
    assert set(result["losses"][0]) >= {"loss_focal", "loss_dice", "loss_iou"}
    ev = result["eval"]
    assert 0.0 <= ev["box_mIoU"] <= 1.0 and 0.0 <= ev["point_mIoU"] <= ev["point_oracle_mIoU"] <= 1.0
    assert ev["counts"]["images"] == 2 and ev["counts"]["instances"] > 0
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    assert [r["eval"] for r in records if "eval" in r] == [ev]
    # the checkpoint, evaluated standalone by both entry points, scores the same
    ckpt = os.path.join(out, "model_final.pth")
    again = sam_evaluate.main(["--checkpoint", ckpt, "--data", tiny_shapes, "--json", str(tmp_path / "r.json")])
    assert again == ev and json.load(open(tmp_path / "r.json")) == ev
    assert generic_evaluate.main(["--checkpoint", ckpt, "--data", tiny_shapes]) == ev
    # a plain state dict needs --arch
    torch.save(torch.load(ckpt, weights_only=False)["model"], tmp_path / "sd.pth")
    with pytest.raises(ValueError, match="--arch"):
        sam_evaluate.main(["--checkpoint", str(tmp_path / "sd.pth"), "--data", tiny_shapes])
