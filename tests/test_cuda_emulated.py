"""The CUDA kernels, host launch code included, executed on the CPU through the
emulation (csrc/emulation/, built by emu_utils.load()) and compared with the CPU
ops, under the three thread/block schedules. Runs everywhere: no GPU needed.

`torch.ops.instseg_emu.<op>` is csrc/cuda/<op>_kernel.cu compiled as C++;
`torch.ops.instseg.<op>` on CPU tensors is the independent CPU kernel."""
import warnings

import pytest
import torch

import emu_utils
from roi_utils import as_layout, random_rois
from test_nms import random_boxes
from test_paste_masks import random_case

cpu = torch.ops.instseg
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LAYOUTS = ["nchw", "channels_last"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(scope="session")
def emu():
    return emu_utils.load()  # a build failure fails the tests: never skipped


@pytest.fixture(params=emu_utils.SCHEDULES)
def schedule(request, emu, seed):
    emu_utils.configure(request.param, seed)
    yield request.param
    emu_utils.configure()


@pytest.fixture(autouse=True)
def poisoned():
    """Uninitialised outputs (at::empty) are filled with NaN / max values, so
    elements a kernel fails to write show up. warn_only: the atomic backward
    alerts in deterministic mode."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*does not have a deterministic implementation.*")
        yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


def close(got, want, tol):
    assert got.dtype == want.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol, equal_nan=True)


def roi_problem(dtype, layout, n=2, c=11, h=23, w=37, k=40, scale=0.5):
    x = as_layout(torch.randn(n, c, h, w, dtype=torch.float64).to(dtype), layout)
    rois = random_rois(k, n, h, w, scale=scale, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                       malformed=True)
    return x, rois


# --------------------------------------------------------------------------- roi_align
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_forward(emu, schedule, dtype, layout, aligned):
    x, rois = roi_problem(dtype, layout)
    for sr in (-1, 2):
        got = emu.roi_align(x, rois, 0.5, 5, 4, sr, aligned)
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        assert got.is_contiguous(memory_format=fmt)
        close(got, cpu.roi_align(x, rois, 0.5, 5, 4, sr, aligned), TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_roi_align_backward(emu, schedule, dtype, layout, deterministic):
    n, c, h, w = 2, 11, 23, 37  # 11 channels: two channel blocks, one partial
    x, rois = roi_problem(dtype, layout, n, c, h, w)
    cl = layout == "channels_last"
    g = torch.randn(rois.shape[0], c, 5, 4, dtype=torch.float64).to(dtype)
    if cl:
        g = g.contiguous(memory_format=torch.channels_last)
    for aligned in (False, True):
        got = emu._roi_align_backward(g, rois, 0.5, 5, 4, n, c, h, w, -1, aligned, cl, deterministic)
        want = cpu._roi_align_backward(g, rois, 0.5, 5, 4, n, c, h, w, -1, aligned, cl, deterministic)
        if cl:
            assert got.is_contiguous(memory_format=torch.channels_last)
        close(got, want, 4 * TOL[dtype])


def test_roi_align_backward_channels_last_atomic_regression(emu, seed):
    """Bug found by the emulation: the atomic backward's accumulation buffer
    for a channels_last input was NCHW (at::zeros ignores the memory format),
    so the kernel's channels_last offsets landed on the wrong elements."""
    n, c, h, w = 2, 6, 9, 13
    x, rois = roi_problem(torch.float32, "channels_last", n, c, h, w, k=12)
    g = torch.randn(12, c, 3, 3).contiguous(memory_format=torch.channels_last)
    got = emu._roi_align_backward(g, rois, 0.5, 3, 3, n, c, h, w, 2, True, True, False)
    want = cpu._roi_align_backward(g, rois, 0.5, 3, 3, n, c, h, w, 2, True, True, False)
    close(got, want, 4e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multilevel(emu, schedule, dtype, layout):
    n, c = 2, 9
    sizes = [(40, 52), (20, 26), (10, 13), (0, 7)]  # the last level is empty
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    feats = [as_layout(torch.randn(n, c, hh, ww, dtype=torch.float64).to(dtype), layout) for hh, ww in sizes]
    k = 50
    rois = random_rois(k, n, 40, 52, scale=0.25, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    levels = torch.randint(0, len(sizes), (k,))
    got = emu.multilevel_roi_align(feats, rois, levels, scales, 4, 3, 2, True)
    close(got, cpu.multilevel_roi_align(feats, rois, levels, scales, 4, 3, 2, True), TOL[dtype])
    cl = layout == "channels_last"
    g = torch.randn(k, c, 4, 3, dtype=torch.float64).to(dtype)
    for det in (False, True):
        args = (g, rois, levels, scales, 4, 3, [n, c] + [v for s in sizes for v in s], 2, True, cl, det)
        for a, b in zip(emu._multilevel_roi_align_backward(*args), cpu._multilevel_roi_align_backward(*args)):
            close(a, b, 4 * TOL[dtype])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_roi_align_empty_inputs(emu, schedule, layout):
    x, rois = roi_problem(torch.float32, layout)
    none = rois[:0]
    assert emu.roi_align(x, none, 0.5, 3, 3, 2, True).shape == (0, 11, 3, 3)
    empty_c = x[:, :0]
    assert emu.roi_align(empty_c, rois, 0.5, 3, 3, 2, True).shape == (40, 0, 3, 3)
    cl = layout == "channels_last"
    for det in (False, True):
        gin = emu._roi_align_backward(torch.zeros(0, 11, 3, 3), none, 0.5, 3, 3, 2, 11, 23, 37, 2, True, cl, det)
        assert gin.shape == (2, 11, 23, 37) and torch.equal(gin, torch.zeros_like(gin))
        if cl:
            assert gin.is_contiguous(memory_format=torch.channels_last)
        gin = emu._roi_align_backward(torch.zeros(40, 11, 3, 3), rois, 0.5, 3, 3, 2, 11, 0, 37, 2, True, cl, det)
        assert gin.shape == (2, 11, 0, 37)


def test_roi_align_bad_batch_index_raises(emu):
    x, rois = roi_problem(torch.float32, "nchw")
    rois[3, 0] = 5
    with pytest.raises(RuntimeError, match="batch indices"):
        emu.roi_align(x, rois, 0.5, 3, 3, 2, True)


# --------------------------------------------------------------------------- nms
@pytest.mark.parametrize("n", [1, 63, 64, 65, 700])
@pytest.mark.parametrize("categories", [0, 5])
@pytest.mark.parametrize("budget", [None, 8192])
def test_nms(emu, schedule, monkeypatch, n, categories, budget):
    """budget 8192 bytes: 700 boxes take 11 bitmask chunks instead of one."""
    if budget:
        monkeypatch.setenv("INSTSEG_NMS_MASK_BUDGET", str(budget))
    boxes, scores = random_boxes(n, size=300.0)
    idxs = torch.randint(0, categories, (n,)) if categories else None
    for kw in ({}, {"max_output": 10}, {"score_threshold": 0.5}):
        assert torch.equal(emu.nms(boxes, scores, idxs, 0.5, **kw), cpu.nms(boxes, scores, idxs, 0.5, **kw))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_nms_dtypes_and_bad_values(emu, schedule, monkeypatch, dtype):
    monkeypatch.setenv("INSTSEG_NMS_MASK_BUDGET", "4096")
    boxes, scores = random_boxes(300, size=200.0, dtype=dtype)
    scores[5] = float("nan")
    boxes[7, 1] = float("inf")
    scores[9] = float("-inf")
    idxs = torch.randint(0, 4, (300,))
    for cats in (None, idxs):
        for kw in ({}, {"max_output": 0}, {"max_output": 7}, {"score_threshold": 0.3}):
            assert torch.equal(emu.nms(boxes, scores, cats, 0.6, **kw), cpu.nms(boxes, scores, cats, 0.6, **kw))
    assert emu.nms(boxes[:0], scores[:0], None, 0.5).shape == (0,)


def test_nms_bad_budget_raises(emu, monkeypatch):
    monkeypatch.setenv("INSTSEG_NMS_MASK_BUDGET", "lots")
    boxes, scores = random_boxes(10)
    with pytest.raises(RuntimeError, match="INSTSEG_NMS_MASK_BUDGET must be a positive integer"):
        emu.nms(boxes, scores, None, 0.5)


# --------------------------------------------------------------------------- soft_nms
@pytest.mark.parametrize("method", [0, 1])
@pytest.mark.parametrize("n", [0, 1, 33, 300, 1100])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_soft_nms(emu, schedule, method, n, dtype):
    boxes, scores = random_boxes(n, size=200.0, dtype=dtype)
    if n > 1024:
        # More boxes than threads (strided loops), few of them above the score
        # threshold: few selection steps (each is a block-wide rendezvous).
        scores = scores * 0.04
        scores[torch.randperm(n)[:40]] += 0.5
    if n > 10:
        scores[3] = float("nan")
        scores[4] = scores[5]  # a tie: the lower index wins
    keep, kept = emu.soft_nms(boxes, scores, 0.3, 0.5, 0.05, method)
    ref_keep, ref_kept = cpu.soft_nms(boxes, scores, 0.3, 0.5, 0.05, method)
    assert torch.equal(keep, ref_keep)
    tol = 1e-6 if dtype == torch.float32 else 1e-14  # expf on CUDA: 2 ulp
    close(kept, ref_kept, tol)


# --------------------------------------------------------------------------- paste_masks
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.0, 0.5])
@pytest.mark.parametrize("sm_count", [1, 132])
def test_paste_masks(emu, schedule, seed, dtype, aligned, threshold, sm_count):
    """sm_count 1: 32 blocks of 256 threads, far fewer than pixels, so the
    grid-stride loops wrap around many times."""
    emu_utils.configure(schedule, seed, sm_count)
    masks, boxes = random_case(n=12, m=14, tiny=False)
    masks = masks.to(dtype)
    boxes[3] = torch.tensor([-1e7, -1e7, 1e7, 1e7])  # huge box
    boxes[5, 1] = float("nan")
    for padding in (0, 1):
        want = cpu.paste_masks(masks, boxes, 60, 80, padding, threshold, aligned)
        assert torch.equal(emu.paste_masks(masks, boxes, 60, 80, padding, threshold, aligned), want)
        got = emu.paste_masks_crops(masks, boxes, 60, 80, padding, threshold, aligned)
        want = cpu.paste_masks_crops(masks, boxes, 60, 80, padding, threshold, aligned)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def test_paste_masks_empty(emu, schedule):
    out = emu.paste_masks(torch.zeros(0, 5, 5), torch.zeros(0, 4), 10, 20, 1, None, False)
    assert out.shape == (0, 10, 20)
    data, regions, offsets = emu.paste_masks_crops(torch.zeros(0, 5, 5), torch.zeros(0, 4), 10, 20, 1, 0.5, True)
    assert data.shape == (0,) and regions.shape == (0, 4) and torch.equal(offsets, torch.zeros(1, dtype=torch.long))
    assert emu.paste_masks(torch.rand(3, 5, 5), torch.rand(3, 4), 0, 7, 1, None, False).shape == (3, 0, 7)
    off = torch.tensor([[100.0, 100.0, 120.0, 120.0]]).repeat(2, 1)  # outside the image: empty crops
    data, regions, offsets = emu.paste_masks_crops(torch.rand(2, 5, 5), off, 10, 20, 1, None, True)
    assert data.shape == (0,) and torch.equal(offsets, torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sm_count", [1, 132])
def test_paste_masks_backward(emu, schedule, seed, dtype, aligned, sm_count):
    """Both backward ops, bit for bit equal to the CPU kernels (the same terms in the same
    order). sm_count 1 with 40 masks of 14 x 14: 7840 cells on 31 blocks of 256 threads, so
    the grid-stride loop wraps; the huge box puts every pixel on a few cells."""
    emu_utils.configure(schedule, seed, sm_count)
    n = 40 if sm_count == 1 else 12
    masks, boxes = random_case(n=n, m=14, h=60, w=80)
    masks = masks.to(dtype)
    boxes[3] = torch.tensor([-1e7, -1e7, 1e7, 1e7])
    boxes[5, 1] = float("nan")
    g = torch.randn(n, 60, 80, dtype=torch.float64).to(dtype)
    for padding in (0, 1):
        want = cpu._paste_masks_backward(g, masks, boxes, 60, 80, padding, aligned)
        assert torch.equal(emu._paste_masks_backward(g, masks, boxes, 60, 80, padding, aligned), want)
        data, regions, offsets = cpu.paste_masks_crops(masks, boxes, 60, 80, padding, None, aligned)
        gd = torch.randn(data.shape, dtype=torch.float64).to(dtype)
        want = cpu._paste_masks_crops_backward(gd, masks, boxes, regions, offsets, 60, 80, padding, aligned)
        got = emu._paste_masks_crops_backward(gd, masks, boxes, regions, offsets, 60, 80, padding, aligned)
        assert torch.equal(got, want)


def test_paste_masks_backward_empty_and_errors(emu, schedule):
    masks = torch.rand(4, 5, 5)
    boxes = torch.tensor([[2.0, 1.0, 12.0, 8.0], [-3.0, 4.5, 9.0, 12.0], [5.0, 2.0, 19.5, 9.0], [0.0, 0.0, 3.0, 3.0]])
    assert emu._paste_masks_backward(torch.zeros(0, 10, 20), torch.zeros(0, 5, 5), torch.zeros(0, 4), 10, 20, 1,
                                     False).shape == (0, 5, 5)
    zeros = emu._paste_masks_backward(torch.zeros(4, 0, 20), masks, boxes, 0, 20, 1, True)
    assert torch.equal(zeros, torch.zeros_like(masks))
    far = torch.tensor([[100.0, 100.0, 120.0, 120.0]]).repeat(4, 1)
    data, regions, offsets = cpu.paste_masks_crops(masks, far, 10, 20, 1, None, False)
    got = emu._paste_masks_crops_backward(data, masks, far, regions, offsets, 10, 20, 1, False)
    assert torch.equal(got, torch.zeros_like(masks))
    data, regions, offsets = cpu.paste_masks_crops(masks, boxes, 10, 20, 1, None, False)
    bad = regions.clone()
    bad[2, 3] -= 1
    with pytest.raises(RuntimeError, match="region .* of mask 2 differs from the geometry's"):
        emu._paste_masks_crops_backward(data, masks, boxes, bad, offsets, 10, 20, 1, False)
    with pytest.raises(RuntimeError, match="the gradient has"):
        emu._paste_masks_crops_backward(data[:-1], masks, boxes, regions, offsets, 10, 20, 1, False)


# --------------------------------------------------------------------------- connected_components
@pytest.mark.parametrize("connectivity", [4, 8])
def test_connected_components(emu, schedule, connectivity):
    from test_masks_ops import random_masks
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for shape in [(4, 13, 17), (2, 1, 21), (1, 30, 30)]:
        masks = random_masks(gen, *shape)
        labels, areas = emu.connected_components(masks, connectivity)
        want_labels, want_areas = cpu.connected_components(masks, connectivity)
        assert torch.equal(labels, want_labels) and torch.equal(areas, want_areas)
    labels, areas = emu.connected_components(torch.zeros((2, 0, 5), dtype=torch.bool), connectivity)
    assert labels.shape == (2, 0, 5) and areas.shape == (2, 0)


# --------------------------------------------------------------------------- masks_to_boxes, masks_to_rle, stability
def test_mask_ops(emu, schedule):
    from test_masks_ops import random_masks
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    for shape in [(5, 13, 17), (2, 1, 21), (2, 21, 1), (1, 30, 30)]:
        masks = random_masks(gen, *shape)
        masks[-1, 0, 0] = 1   # a set first pixel: an empty leading run
        for m in (masks.bool(), masks * 7):
            assert torch.equal(emu.masks_to_boxes(m), cpu.masks_to_boxes(m))
            counts, offsets = emu.masks_to_rle(m)
            want_counts, want_offsets = cpu.masks_to_rle(m)
            assert torch.equal(counts, want_counts) and torch.equal(offsets, want_offsets)
    for shape in [(0, 4, 4), (3, 0, 5), (3, 5, 0)]:
        m = torch.zeros(shape, dtype=torch.bool)
        assert torch.equal(emu.masks_to_boxes(m), torch.zeros(shape[0], 4, dtype=torch.long))
        counts, offsets = emu.masks_to_rle(m)
        assert counts.shape == (0,) and offsets.tolist() == [0] * (shape[0] + 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_stability_score_and_boxes(emu, schedule, dtype):
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    logits = (torch.randn(4, 19, 23, generator=gen) * 3).to(dtype)
    logits[0] = -5
    logits[1] = torch.randint(-3, 4, (19, 23), generator=gen).to(dtype)   # values on the thresholds
    for thr, off in [(0.0, 1.0), (0.3, 0.7)]:
        scores, boxes = emu.stability_score_and_boxes(logits, thr, off)
        want_scores, want_boxes = cpu.stability_score_and_boxes(logits, thr, off)
        torch.testing.assert_close(scores, want_scores, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(boxes, want_boxes)
    scores, boxes = emu.stability_score_and_boxes(torch.zeros(2, 0, 3, dtype=dtype), 0.0, 1.0)
    assert torch.isnan(scores).all() and not boxes.any()
    assert emu.stability_score_and_boxes(torch.zeros(0, 3, 3, dtype=dtype), 0.0, 1.0)[0].shape == (0,)
