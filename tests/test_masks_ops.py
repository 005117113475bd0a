"""The binary-mask ops: ``connected_components`` (CPU kernel; CUDA kernel through the
emulation in test_cuda_emulated.py) against a plain-Python breadth-first labelling,
``masks_to_rle`` against pycocotools and the official SAM loop, ``masks_to_boxes``,
``stability_score``; fake kernels and opcheck; bad input."""
import numpy as np
import pytest
import torch
from torch.library import opcheck

import instseg_ops


def reference_label(mask: np.ndarray, connectivity: int = 8):
    """Breadth-first labelling in plain Python: labels numbered in raster order of their first
    pixel (as scipy.ndimage.label), and the area of each."""
    from collections import deque
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    areas = []
    for y in range(h):
        for x in range(w):
            if mask[y, x] and not labels[y, x]:
                k = len(areas) + 1
                labels[y, x] = k
                queue, n = deque([(y, x)]), 0
                while queue:
                    cy, cx = queue.popleft()
                    n += 1
                    for dy, dx in steps:
                        ny, nx = cy + dy, cx + dx
                        if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                            labels[ny, nx] = k
                            queue.append((ny, nx))
                areas.append(n)
    return labels, np.array(areas, dtype=np.int64)



def random_masks(gen, n, h, w, density=None):
    """Blobs of random density, some empty and some full masks, as uint8."""
    if n * h * w == 0:
        return torch.zeros((n, h, w), dtype=torch.uint8)
    d = torch.rand(n, 1, 1, generator=gen) if density is None else torch.full((n, 1, 1), density)
    noise = torch.rand(n, 1, max(1, h // 3), max(1, w // 3), generator=gen)
    smooth = torch.nn.functional.interpolate(noise, (h, w), mode="bilinear", align_corners=False)[:, 0]
    masks = (smooth + 0.3 * torch.rand(n, h, w, generator=gen)) < d * 1.3
    if n > 2:
        masks[0] = False
        masks[1] = True
    return masks.to(torch.uint8)


def check_against_reference(masks, connectivity, labels, areas):
    n = masks.shape[0]
    assert labels.dtype == torch.int32 and labels.shape == masks.shape
    assert areas.dtype == torch.int64 and areas.shape[0] == n
    k_max = 0
    for i in range(n):
        want_l, want_a = reference_label(masks[i].numpy().astype(bool), connectivity)
        assert np.array_equal(labels[i].numpy(), want_l), f"mask {i}"
        k = len(want_a)
        k_max = max(k_max, k)
        assert np.array_equal(areas[i, :k].numpy(), want_a) and not areas[i, k:].any()
    assert areas.shape[1] == k_max


@pytest.mark.parametrize("connectivity", [4, 8])
@pytest.mark.parametrize("shape", [(5, 17, 23), (3, 1, 40), (3, 40, 1), (1, 64, 64), (4, 2, 3)])
def test_connected_components_matches_reference(seed, connectivity, shape):
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(gen, *shape)
    labels, areas = instseg_ops.connected_components(masks.bool(), connectivity)
    check_against_reference(masks, connectivity, labels, areas)
    try:   # and scipy.ndimage.label, when installed (same numbering)
        from scipy import ndimage
    except ImportError:
        ndimage = None
    if ndimage is not None:
        structure = np.ones((3, 3)) if connectivity == 8 else None
        for m, lab in zip(masks.numpy(), labels.numpy()):
            want, _ = ndimage.label(m, structure=structure)
            assert np.array_equal(lab, want)
    for dtype in (torch.uint8, torch.int64):   # nonzero = foreground
        l2, a2 = instseg_ops.connected_components((masks * 3).to(dtype), connectivity)
        assert torch.equal(l2, labels) and torch.equal(a2, areas)


def test_connected_components_shapes_that_need_many_rounds():
    """A spiral and a comb: long paths through the mask, and 4- vs 8-connectivity differing."""
    h = w = 31
    spiral = np.zeros((h, w), dtype=bool)
    y0, x0, y1, x1 = 0, 0, h - 1, w - 1
    while y0 <= y1 and x0 <= x1:
        spiral[y0, x0:x1 + 1] = True
        spiral[y0:y1 + 1, x1] = True
        spiral[y1, x0:x1 + 1] = True
        spiral[y0 + 2:y1 + 1, x0] = True
        if y0 + 2 <= y1:
            spiral[y0 + 2, x0:x1 - 1] = True
        y0, x0, y1, x1 = y0 + 2, x0 + 2, y1 - 2, x1 - 2
    diag = np.eye(h, dtype=bool) | np.eye(h, dtype=bool)[::-1]
    comb = np.zeros((h, w), dtype=bool)
    comb[:, ::2] = True
    comb[0] = True
    masks = torch.from_numpy(np.stack([spiral, diag, comb, ~spiral]))
    for c in (4, 8):
        labels, areas = instseg_ops.connected_components(masks, c)
        check_against_reference(masks, c, labels, areas)


def test_connected_components_empty_and_errors():
    for shape in [(0, 5, 5), (2, 0, 7), (2, 7, 0)]:
        labels, areas = instseg_ops.connected_components(torch.zeros(shape, dtype=torch.bool))
        assert labels.shape == shape and labels.dtype == torch.int32 and areas.shape == (shape[0], 0)
    with pytest.raises(RuntimeError, match="Tensor\\[N, H, W\\]"):
        instseg_ops.connected_components(torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="threshold logits"):
        instseg_ops.connected_components(torch.zeros(1, 5, 5))
    with pytest.raises(RuntimeError, match="connectivity must be 4 or 8"):
        instseg_ops.connected_components(torch.zeros(1, 5, 5, dtype=torch.bool), 6)
    with pytest.raises(TypeError):
        instseg_ops.connected_components(np.zeros((1, 5, 5), dtype=bool))


def test_connected_components_opcheck_and_fake(seed):
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(gen, 3, 12, 9).bool()
    opcheck(torch.ops.instseg.connected_components.default, (masks, 8))
    opcheck(torch.ops.instseg.connected_components.default, (masks, 4))
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        labels, areas = torch.ops.instseg.connected_components(mode.from_tensor(masks), 8)
    assert labels.shape == masks.shape and labels.dtype == torch.int32 and areas.dtype == torch.int64


def test_connected_components_poisoned_outputs(seed):
    """Uninitialised outputs are filled with garbage: every element must be written."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        gen = torch.Generator().manual_seed(seed)
        masks = random_masks(gen, 4, 13, 11)
        check_against_reference(masks, 8, *instseg_ops.connected_components(masks, 8))
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


# --------------------------------------------------------------------------- RLE, boxes, stability

def official_rle(tensor):
    """segment-anything's mask_to_rle_pytorch, restated (a loop over masks in Python)."""
    b, h, w = tensor.shape
    tensor = tensor.permute(0, 2, 1).flatten(1)
    diff = tensor[:, 1:] ^ tensor[:, :-1]
    change = diff.nonzero()
    out = []
    for i in range(b):
        idx = change[change[:, 0] == i, 1]
        idx = torch.cat([torch.tensor([0]), idx + 1, torch.tensor([h * w])])
        counts = [] if tensor[i, 0] == 0 else [0]
        counts.extend((idx[1:] - idx[:-1]).tolist())
        out.append({"size": [h, w], "counts": counts})
    return out


def sam_amg():
    return pytest.importorskip("segment_anything.utils.amg")


MASK_SHAPES = [(6, 19, 27), (3, 1, 9), (2, 9, 1), (1, 32, 32), (5, 8, 70)]


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_masks_to_rle_matches_official_loop_and_pycocotools(seed, shape):
    from pycocotools import mask as mask_utils
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(gen, *shape).bool()
    got = instseg_ops.masks_to_rle(masks)
    assert got == official_rle(masks)
    assert got == sam_amg().mask_to_rle_pytorch(masks)
    for rle, m in zip(got, masks):
        assert all(type(c) is int for c in rle["counts"])
        coco = mask_utils.frPyObjects(rle, *rle["size"])
        assert np.array_equal(mask_utils.decode(coco), m.numpy().astype(np.uint8))
        assert mask_utils.area(coco) == int(m.sum()) == sum(rle["counts"][1::2])
        assert sam_amg().rle_to_mask(rle).tolist() == m.tolist()
    for dtype in (torch.uint8, torch.int32, torch.int64):   # nonzero = foreground
        assert instseg_ops.masks_to_rle((masks * 5).to(dtype)) == got
    strided = masks.transpose(1, 2)   # non-contiguous input
    assert instseg_ops.masks_to_rle(strided) == official_rle(strided.contiguous())


def test_masks_to_rle_op_layout_and_edge_cases(seed):
    """The raw op: flat counts and offsets, every element written (poisoned outputs); empty
    masks, full masks, a single set first pixel, 0-size batches."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        gen = torch.Generator().manual_seed(seed)
        masks = random_masks(gen, 7, 11, 13).bool()
        masks[2] = False
        masks[2, 0, 0] = True      # first pixel set: a leading 0
        masks[3] = False
        masks[3, -1, -1] = True    # last pixel only
        counts, offsets = torch.ops.instseg.masks_to_rle(masks)
        assert counts.dtype == offsets.dtype == torch.int64 and offsets.shape == (8,)
        want = official_rle(masks)
        assert offsets.tolist() == np.cumsum([0] + [len(r["counts"]) for r in want]).tolist()
        assert counts.tolist() == [c for r in want for c in r["counts"]]
        rles = instseg_ops.masks_to_rle(masks)
        assert rles[0]["counts"] == [11 * 13]               # empty
        assert rles[1]["counts"] == [0, 11 * 13]            # full
        assert rles[2]["counts"] == [0, 1, 11 * 13 - 1]
        assert rles[3]["counts"] == [11 * 13 - 1, 1]
        for shape in [(0, 4, 4), (3, 0, 5), (3, 5, 0), (0, 0, 0)]:
            counts, offsets = torch.ops.instseg.masks_to_rle(torch.zeros(shape, dtype=torch.bool))
            assert counts.shape == (0,) and offsets.tolist() == [0] * (shape[0] + 1)
            assert instseg_ops.masks_to_rle(torch.zeros(shape, dtype=torch.bool)) == [
                {"size": list(shape[1:]), "counts": []} for _ in range(shape[0])]
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


def reference_boxes(masks):
    out = []
    for m in masks:
        ys, xs = torch.nonzero(m, as_tuple=True)
        out.append([0, 0, 0, 0] if len(xs) == 0 else [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())])
    return torch.tensor(out, dtype=torch.int64).reshape(-1, 4)


@pytest.mark.parametrize("shape", MASK_SHAPES)
def test_masks_to_boxes(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(gen, *shape).bool()
    if shape[0] > 3:   # single pixels and lines: degenerate boxes
        masks[2] = False
        masks[2, shape[1] // 2, shape[2] - 1] = True
        masks[3] = False
        masks[3, :, 0] = True
    boxes = instseg_ops.masks_to_boxes(masks)
    assert boxes.dtype == torch.int64 and boxes.shape == (shape[0], 4)
    assert torch.equal(boxes, reference_boxes(masks))
    assert torch.equal(boxes, sam_amg().batched_mask_to_box(masks))
    for dtype in (torch.uint8, torch.int16, torch.int64, torch.float32):   # nonzero = foreground
        assert torch.equal(instseg_ops.masks_to_boxes((masks * 3).to(dtype)), boxes)
    assert torch.equal(instseg_ops.masks_to_boxes(masks.transpose(1, 2)), reference_boxes(masks.transpose(1, 2)))
    assert torch.equal(instseg_ops.masks_to_boxes(masks.reshape(shape[0], 1, *shape[1:])), boxes[:, None])
    assert torch.equal(instseg_ops.masks_to_boxes(masks[0]), boxes[0])
    torchvision = pytest.importorskip("torchvision")
    tv = instseg_ops.masks_to_boxes_torchvision(masks)
    assert tv.dtype == torch.float32 and torch.equal(tv, torchvision.ops.masks_to_boxes(masks))


def test_masks_to_boxes_empty_inputs():
    for shape in [(0, 3, 3), (2, 0, 3), (2, 3, 0)]:
        m = torch.zeros(shape, dtype=torch.bool)
        boxes = instseg_ops.masks_to_boxes(m)
        assert boxes.dtype == torch.int64 and boxes.shape == (shape[0], 4) and not boxes.any()
        tv = pytest.importorskip("torchvision").ops.masks_to_boxes(m)
        assert torch.equal(instseg_ops.masks_to_boxes_torchvision(m), tv)
    with pytest.raises(RuntimeError, match="threshold logits"):
        torch.ops.instseg.masks_to_boxes(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match="\\(\\.\\.\\., H, W\\)"):
        instseg_ops.masks_to_boxes(torch.zeros(3, dtype=torch.bool))


def official_stability(logits, thr, off):
    """segment-anything's calculate_stability_score when installed, else its formula."""
    try:
        from segment_anything.utils.amg import calculate_stability_score
    except ImportError:
        return ((logits > thr + off).flatten(1).sum(1, dtype=torch.int32)
                / (logits > thr - off).flatten(1).sum(1, dtype=torch.int32))
    return calculate_stability_score(logits, thr, off)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_stability_score_and_boxes(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(6, 20, 30, generator=gen) * 3).to(dtype)
    logits[0] = -5          # empty at every threshold: NaN score, zero box
    logits[1, :4] = 1.0     # values exactly on a threshold (strict >)
    logits[2] = torch.randint(-3, 4, (20, 30), generator=gen).to(dtype)
    for thr, off in [(0.0, 1.0), (0.3, 0.7), (-1.0, 2.5)]:
        scores, boxes = instseg_ops.stability_score_and_boxes(logits, thr, off)
        want = official_stability(logits, thr, off)
        assert scores.dtype == torch.float32 and scores.shape == (6,)
        torch.testing.assert_close(scores, want, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(boxes, reference_boxes(logits > thr))
        assert torch.equal(boxes, sam_amg().batched_mask_to_box(logits > thr))
        torch.testing.assert_close(instseg_ops.stability_score(logits, thr, off), want, rtol=0, atol=0,
                                   equal_nan=True)
    assert torch.isnan(scores[0]) and not boxes[0].any()
    s4, b4 = instseg_ops.stability_score_and_boxes(logits.reshape(2, 3, 20, 30))
    assert s4.shape == (2, 3) and b4.shape == (2, 3, 4)
    torch.testing.assert_close(s4.flatten(), official_stability(logits, 0.0, 1.0), rtol=0, atol=0, equal_nan=True)


def test_stability_score_and_boxes_edge_cases():
    s, b = instseg_ops.stability_score_and_boxes(torch.zeros(0, 4, 4))
    assert s.shape == (0,) and b.shape == (0, 4)
    s, b = instseg_ops.stability_score_and_boxes(torch.zeros(2, 0, 4))
    assert torch.isnan(s).all() and not b.any()
    with pytest.raises(RuntimeError, match="floating point"):
        torch.ops.instseg.stability_score_and_boxes(torch.zeros(1, 3, 3, dtype=torch.bool), 0.0, 1.0)
    with pytest.raises(RuntimeError, match="finite"):
        torch.ops.instseg.stability_score_and_boxes(torch.zeros(1, 3, 3), float("nan"), 1.0)


def test_stability_score(seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 20, 30, generator=gen) * 3
    got = instseg_ops.stability_score(logits, 0.0, 1.0)
    want = (logits > 1).flatten(1).sum(1).float() / (logits > -1).flatten(1).sum(1).float()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-7)


def test_mask_ops_opcheck_and_fake(seed):
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(gen, 4, 9, 12).bool()
    opcheck(torch.ops.instseg.masks_to_boxes.default, (masks,))
    opcheck(torch.ops.instseg.masks_to_rle.default, (masks,))
    logits = torch.randn(3, 7, 5, generator=gen)
    opcheck(torch.ops.instseg.stability_score_and_boxes.default, (logits, 0.0, 1.0))
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        counts, offsets = torch.ops.instseg.masks_to_rle(mode.from_tensor(masks))
        boxes = torch.ops.instseg.masks_to_boxes(mode.from_tensor(masks))
        scores, sboxes = torch.ops.instseg.stability_score_and_boxes(mode.from_tensor(logits), 0.0, 1.0)
    assert counts.dtype == torch.int64 and offsets.shape == (5,) and boxes.shape == (4, 4)
    assert scores.shape == (3,) and scores.dtype == torch.float32 and sboxes.shape == (3, 4)


# ------------------------------------------------------------------ properties (hypothesis)
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def small_masks(draw):
    n = draw(st.integers(0, 3))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    bits = draw(st.lists(st.booleans(), min_size=n * h * w, max_size=n * h * w))
    return np.array(bits, dtype=bool).reshape(n, h, w)


def _box_of(m):
    ys, xs = np.nonzero(m)
    return [0, 0, 0, 0] if len(xs) == 0 else [xs.min(), ys.min(), xs.max(), ys.max()]


@settings(max_examples=80, deadline=None)
@given(m=small_masks())
def test_masks_to_rle_and_boxes_properties(m):
    # RLE: counts alternate starting with zeros, sum to H*W, and expand (column-major) back to
    # the mask; boxes: the tightest inclusive box of the set pixels, zeros when none.
    from pycocotools import mask as mask_utils
    t = torch.from_numpy(m)
    rles = instseg_ops.masks_to_rle(t)
    assert len(rles) == m.shape[0]
    for mask, rle in zip(m, rles):
        h, w = mask.shape
        counts = rle["counts"]
        assert rle["size"] == [h, w] and sum(counts) == h * w and all(c > 0 for c in counts[1:])
        flat = np.repeat(np.arange(len(counts)) % 2, counts).astype(bool)
        np.testing.assert_array_equal(flat.reshape(w, h).T, mask)
        coco = mask_utils.frPyObjects(rle, h, w)
        np.testing.assert_array_equal(mask_utils.decode(coco).astype(bool), mask)
    boxes = instseg_ops.masks_to_boxes(t)
    assert boxes.dtype == torch.int64 and boxes.shape == (m.shape[0], 4)
    assert boxes.tolist() == [_box_of(x) for x in m]


@settings(max_examples=80, deadline=None)
@given(m=small_masks(), data=st.data())
def test_stability_score_and_boxes_properties(m, data):
    # Logits on a coarse grid so that values equal to the thresholds occur: the score is the
    # count above thr + offset over the count above thr - offset (NaN when that is 0), the
    # boxes those of logits > thr.
    n, h, w = m.shape
    vals = data.draw(st.lists(st.sampled_from([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]),
                              min_size=n * h * w, max_size=n * h * w))
    logits = np.array(vals, dtype=np.float32).reshape(n, h, w)
    thr, off = data.draw(st.sampled_from([(0.0, 1.0), (0.5, 0.5), (-0.5, 1.5)]))
    scores, boxes = instseg_ops.stability_score_and_boxes(torch.from_numpy(logits), thr, off)
    for i in range(n):
        inter = (logits[i] > np.float32(thr + off)).sum()
        union = (logits[i] > np.float32(thr - off)).sum()
        if union == 0:
            assert torch.isnan(scores[i])
        else:
            assert scores[i].item() == pytest.approx(inter / union, rel=1e-6)
        assert boxes[i].tolist() == _box_of(logits[i] > thr)
