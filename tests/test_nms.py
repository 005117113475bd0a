"""NMS and batched NMS on the CPU: reference, torchvision, properties, robustness."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from conftest import requires_cuda
from instseg_ops import batched_nms, nms, soft_nms
from instseg_ops.reference import nms_reference

try:
    import torchvision
except ImportError:
    torchvision = None

needs_torchvision = pytest.mark.skipif(torchvision is None, reason="torchvision not installed")


def random_boxes(n, size=1000.0, max_wh=100.0, dtype=torch.float32, generator=None):
    """Many overlapping boxes and distinct scores."""
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * size
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * max_wh + 1
    boxes = torch.cat([xy, xy + wh], dim=1).to(dtype)
    scores = (torch.randperm(n, generator=generator).double() / max(n, 1)).to(dtype)  # distinct
    return boxes, scores


def iou_matrix(b):
    b = b.double()
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    lt = torch.maximum(b[:, None, :2], b[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], b[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area[:, None] + area[None, :] - inter)


@pytest.mark.parametrize("n", [0, 1, 2, 50, 300])
@pytest.mark.parametrize("thr", [0.0, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_nms_matches_reference(seed, n, thr, dtype):
    boxes, scores = random_boxes(n, size=300.0, dtype=dtype)
    keep = nms(boxes, scores, thr)
    assert keep.dtype == torch.int64
    assert torch.equal(keep, nms_reference(boxes, scores, thr))


# n = 2000 with 3 or 20 categories runs the categories in parallel on the CPU (more than 2^16
# IoUs in all); the smaller cases run them one after the other.
@pytest.mark.parametrize("n", [2, 100, 400, 2000])
@pytest.mark.parametrize("categories", [1, 3, 20])
def test_batched_nms_matches_reference_and_union_of_categories(seed, n, categories):
    boxes, scores = random_boxes(n, size=200.0)
    idxs = torch.randint(0, categories, (n,))
    keep = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(keep, nms_reference(boxes, scores, 0.5, idxs))
    union = []
    for c in idxs.unique():
        sel = (idxs == c).nonzero().flatten()
        union += sel[nms(boxes[sel], scores[sel], 0.5)].tolist()
    assert sorted(union) == sorted(keep.tolist())


@needs_torchvision
@pytest.mark.parametrize("n", [10, 1000, 5000])
@pytest.mark.parametrize("thr", [0.3, 0.5, 0.8])
def test_matches_torchvision(seed, n, thr):
    boxes, scores = random_boxes(n)
    assert torch.equal(nms(boxes, scores, thr), torchvision.ops.nms(boxes, scores, thr))
    # torchvision's batched_nms moves small inputs' boxes apart by category (x + idx * 1101),
    # which rounds float32 coordinates: at IoUs within rounding of the threshold the two may
    # then differ. Coordinates on a 1/16 grid keep that offset, the areas and the
    # intersections exact, so both sides divide the same numbers.
    boxes = (boxes * 16).round() / 16
    idxs = torch.randint(0, 80, (n,))
    assert torch.equal(batched_nms(boxes, scores, idxs, thr), torchvision.ops.batched_nms(boxes, scores, idxs, thr))


def _pair_with_iou(generator, dtype):
    """Two overlapping boxes and their IoU as the kernels compute it (in dtype)."""
    while True:
        a, _ = random_boxes(1, size=60.0, dtype=dtype, generator=generator)
        b, _ = random_boxes(1, size=60.0, dtype=dtype, generator=generator)
        w = (torch.minimum(a[0, 2], b[0, 2]) - torch.maximum(a[0, 0], b[0, 0])).clamp(min=0)
        h = (torch.minimum(a[0, 3], b[0, 3]) - torch.maximum(a[0, 1], b[0, 1])).clamp(min=0)
        inter = w * h
        area_a = (a[0, 2] - a[0, 0]) * (a[0, 3] - a[0, 1])
        area_b = (b[0, 2] - b[0, 0]) * (b[0, 3] - b[0, 1])
        iou = float(inter / (area_a + area_b - inter))
        if 0.05 < iou < 0.95:
            return torch.cat([a, b]), iou


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[requires_cuda, pytest.mark.cuda])])
def test_threshold_is_compared_exactly(seed, dtype, device):
    """A float32 IoU is compared with the float64 threshold, not with the threshold rounded
    to float32: with thr just below the IoU, float32(thr) == IoU and 'IoU > float32(thr)' is
    false. This is where a CI run once saw torchvision (which compares in float64) differ."""
    import math
    g = torch.Generator().manual_seed(seed)
    for _ in range(20):
        boxes, iou = _pair_with_iou(g, dtype)
        boxes = boxes.to(device)
        scores = torch.tensor([0.9, 0.8], dtype=dtype, device=device)
        idxs = torch.zeros(2, dtype=torch.int64, device=device)
        below = math.nextafter(iou, -math.inf)  # the largest float64 under the IoU
        assert nms(boxes, scores, below).tolist() == [0]
        assert nms(boxes, scores, iou).tolist() == [0, 1]
        assert batched_nms(boxes, scores, idxs, below).tolist() == [0]
        assert nms_reference(boxes.cpu(), scores.cpu(), below).tolist() == [0]
        assert nms_reference(boxes.cpu(), scores.cpu(), iou).tolist() == [0, 1]
        if torchvision is not None and device == "cpu":
            assert torchvision.ops.nms(boxes, scores, below).tolist() == [0]
        # The score threshold likewise: a score just under it is dropped.
        s = float(scores[1])
        assert nms(boxes, scores, 1.0, score_threshold=math.nextafter(s, math.inf)).tolist() == [0]
        assert nms(boxes, scores, 1.0, score_threshold=s).tolist() == [0, 1]
        # Linear soft-NMS decays the second score only when IoU > threshold.
        _, kept = soft_nms(boxes, scores, below, 0.5, 0.0, "linear")
        assert float(kept[1]) < s
        _, kept = soft_nms(boxes, scores, iou, 0.5, 0.0, "linear")
        assert float(kept[1]) == s
        keep, _ = soft_nms(boxes, scores, 1.0, 0.5, math.nextafter(s, math.inf), "linear")
        assert keep.tolist() == [0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thresholds_beyond_the_float_range(seed, dtype):
    boxes, scores = random_boxes(50, size=100.0, dtype=dtype)
    everything = sorted(range(50))
    assert sorted(nms(boxes, scores, 1e300).tolist()) == everything
    assert sorted(nms(boxes, scores, -1e300).tolist()) == nms(boxes, scores, -1.0).tolist() == [int(scores.argmax())]
    assert nms(boxes, scores, 1e300, score_threshold=1e300).numel() == 0
    assert sorted(nms(boxes, scores, 1e300, score_threshold=-1e300).tolist()) == everything
    assert sorted(soft_nms(boxes, scores, 1e300, 0.5, -1e300)[0].tolist()) == everything
    # A tiny positive sigma is the float32 limit, not 0 (which would make exp(-iou^2 / sigma) NaN):
    # boxes that overlap the kept ones decay to 0, the others keep their scores.
    keep, kept = soft_nms(boxes, scores, 0.3, 1e-300, 0.0, "gaussian")
    assert torch.isfinite(kept).all()
    with pytest.raises(RuntimeError, match="sigma must be finite and > 0"):
        soft_nms(boxes, scores, 0.3, float("inf"), 0.0, "gaussian")


def test_ties_break_by_lower_index():
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60], [50, 50, 60, 60.]])
    scores = torch.tensor([0.5, 0.5, 0.5, 0.9])
    assert nms(boxes, scores, 0.5).tolist() == [3, 0]
    assert batched_nms(boxes, scores, torch.tensor([1, 0, 1, 1]), 0.5).tolist() == [3, 0, 1]


def test_max_output_and_score_threshold(seed):
    boxes, scores = random_boxes(500)
    full = nms(boxes, scores, 0.5)
    assert torch.equal(nms(boxes, scores, 0.5, max_output=7), full[:7])
    assert nms(boxes, scores, 0.5, max_output=0).numel() == 0
    idxs = torch.randint(0, 5, (500,))
    full_b = batched_nms(boxes, scores, idxs, 0.5)
    assert torch.equal(batched_nms(boxes, scores, idxs, 0.5, max_output=11), full_b[:11])
    thr = float(scores.median())
    kept = nms(boxes, scores, 0.5, score_threshold=thr)
    assert (scores[kept] >= thr).all()
    keep_ref = nms_reference(boxes[scores >= thr], scores[scores >= thr], 0.5)
    assert torch.equal(kept, (scores >= thr).nonzero().flatten()[keep_ref])


def test_nonfinite_inputs_are_dropped_and_bad_inputs_raise():
    boxes, scores = random_boxes(20)
    scores[3] = float("nan")
    boxes[5, 2] = float("inf")
    boxes[6, 0] = float("nan")
    keep = nms(boxes, scores, 0.5)
    assert not {3, 5, 6} & set(keep.tolist())
    assert torch.equal(keep, nms_reference(boxes, scores, 0.5))
    assert nms(torch.zeros(0, 4), torch.zeros(0), 0.5).shape == (0,)
    assert batched_nms(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.int64), 0.5).shape == (0,)
    with pytest.raises(RuntimeError, match=r"Tensor\[N, 4\]"):
        nms(boxes[:, :3], scores, 0.5)
    with pytest.raises(RuntimeError, match="one score per box"):
        nms(boxes, scores[:-1], 0.5)
    with pytest.raises(RuntimeError, match="floating"):
        nms(boxes.long(), scores, 0.5)
    with pytest.raises(RuntimeError, match="iou_threshold is NaN"):
        nms(boxes, scores, float("nan"))
    with pytest.raises(RuntimeError, match="integer"):  # the op itself; the wrapper maps floats to categories
        torch.ops.instseg.nms(boxes, scores, torch.zeros(20), 0.5, -1, None)
    with pytest.raises(RuntimeError, match="one category per box"):
        batched_nms(boxes, scores, torch.zeros(3, dtype=torch.int64), 0.5)


def test_infinite_scores_are_kept_like_torchvision(seed):
    """+inf and -inf scores are ordinary scores (first and last), as in torchvision; NaN is dropped."""
    boxes, scores = random_boxes(300, size=200.0)
    scores[torch.randperm(300)[:40]] = float("inf")
    scores[torch.randperm(300)[:40]] = -float("inf")
    scores[7] = float("nan")
    # Without ties (one +inf, one -inf) torchvision's answer is fully specified: the same, in order.
    single = torch.randperm(300)[:2]
    distinct = (torch.randperm(300).double() / 300).float()
    distinct[single[0]], distinct[single[1]] = float("inf"), -float("inf")
    if torchvision is not None:
        for thr in (0.3, 0.7):
            assert torch.equal(nms(boxes, distinct, thr), torchvision.ops.nms(boxes, distinct, thr))
    for thr in (0.3, 0.7):
        keep = nms(boxes, scores, thr)
        assert 7 not in keep.tolist()
        assert torch.equal(keep, nms_reference(boxes, scores, thr))
        idxs = torch.randint(0, 5, (300,))
        assert torch.equal(batched_nms(boxes, scores, idxs, thr), nms_reference(boxes, scores, thr, idxs))
    b = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.]])
    s = torch.tensor([float("inf"), 0.9, -float("inf")])
    assert nms(b, s, 0.5).tolist() == [0, 2]


def test_batched_nms_accepts_bool_and_float_categories(seed):
    boxes, scores = random_boxes(200, size=100.0)
    cats = torch.randint(0, 4, (200,))
    expect = batched_nms(boxes, scores, cats, 0.5)
    values = torch.tensor([-1.5, 0.25, 3.0, 1e6])  # any distinct values name the categories
    assert torch.equal(batched_nms(boxes, scores, values[cats], 0.5), expect)
    assert torch.equal(batched_nms(boxes, scores, (cats > 1), 0.5),
                       batched_nms(boxes, scores, (cats > 1).long(), 0.5))


def test_opcheck_and_compile(seed):
    boxes, scores = random_boxes(64, size=200.0)
    idxs = torch.randint(0, 4, (64,))
    opcheck(torch.ops.instseg.nms.default, (boxes, scores, None, 0.5, -1, None))
    opcheck(torch.ops.instseg.nms.default, (boxes, scores, idxs, 0.5, 10, 0.2))
    torch._dynamo.reset()

    def f(b, s, i):
        keep = batched_nms(b, s, i, 0.5)
        return b[keep].sum(dim=1)

    out = torch.compile(f, fullgraph=True, backend="aot_eager")(boxes, scores, idxs)
    torch.testing.assert_close(out, f(boxes, scores, idxs))


# ---------------------------------------------------------------------------
# Properties


@st.composite
def problems(draw):
    n = draw(st.integers(0, 60))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    boxes, scores = random_boxes(n, size=draw(st.sampled_from([50.0, 200.0])), generator=g)
    idxs = torch.randint(0, draw(st.integers(1, 4)), (n,), generator=g)
    thr = draw(st.floats(0.0, 1.0))
    return boxes, scores, idxs, thr


@settings(max_examples=60, deadline=None)
@given(p=problems())
def test_kept_and_dropped_boxes_satisfy_the_nms_conditions(p):
    boxes, scores, idxs, thr = p
    for batched in (False, True):
        keep = batched_nms(boxes, scores, idxs, thr) if batched else nms(boxes, scores, thr)
        iou = iou_matrix(boxes)
        same = (idxs[:, None] == idxs[None, :]) if batched else torch.ones(len(boxes), len(boxes), dtype=torch.bool)
        kept = keep.tolist()
        assert len(set(kept)) == len(kept)
        assert (scores[keep][1:] <= scores[keep][:-1]).all()  # sorted by score
        for a in range(len(kept)):  # kept pairs do not overlap too much
            for b in range(a + 1, len(kept)):
                i, j = kept[a], kept[b]
                assert not same[i, j] or iou[i, j] <= thr + 1e-6
        for d in set(range(len(boxes))) - set(kept):  # every dropped box has a reason
            assert any(same[d, k] and scores[k] > scores[d] and iou[d, k] > thr - 1e-6 for k in kept)


@settings(max_examples=60, deadline=None)
@given(p=problems(), data=st.data())
def test_permutation_and_scaling_invariance(p, data):
    boxes, scores, idxs, thr = p
    n = boxes.shape[0]
    keep = set(batched_nms(boxes, scores, idxs, thr).tolist())
    perm = torch.tensor(data.draw(st.permutations(range(n))), dtype=torch.int64)
    keep_p = batched_nms(boxes[perm], scores[perm], idxs[perm], thr)
    assert {int(perm[k]) for k in keep_p} == keep
    factor = data.draw(st.sampled_from([0.25, 0.5, 2.0, 8.0]))  # powers of two: exact in float
    assert set(batched_nms(boxes * factor, scores, idxs, thr).tolist()) == keep


@settings(max_examples=30, deadline=None)
@given(p=problems())
def test_threshold_one_keeps_every_box(p):
    boxes, scores, _, _ = p
    assert sorted(nms(boxes, scores, 1.0).tolist()) == list(range(boxes.shape[0]))


# ---------------------------------------------------------------------------
# CUDA (skipped without a GPU)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000, 20000, 300000])
@pytest.mark.parametrize("categories", [0, 80, 1000])
def test_cuda_matches_cpu(seed, n, categories):
    """300k boxes need several bitmask chunks (256 MiB each)."""
    boxes, scores = random_boxes(n, size=1333.0)
    if categories:
        idxs = torch.randint(0, categories, (n,))
        cpu = batched_nms(boxes, scores, idxs, 0.5)
        gpu = batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.5)
    else:
        cpu = nms(boxes, scores, 0.5)
        gpu = nms(boxes.cuda(), scores.cuda(), 0.5)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.int64
    assert torch.equal(gpu.cpu(), cpu)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cuda_dtypes_options_and_bad_values(seed, dtype):
    boxes, scores = random_boxes(3000, dtype=dtype)
    scores[5] = float("nan")
    boxes[7, 1] = float("inf")
    idxs = torch.randint(0, 7, (3000,))
    for kw in ({}, {"max_output": 10}, {"score_threshold": 0.5}, {"max_output": 0}):
        assert torch.equal(nms(boxes.cuda(), scores.cuda(), 0.6, **kw).cpu(), nms(boxes, scores, 0.6, **kw))
        assert torch.equal(batched_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.6, **kw).cpu(),
                           batched_nms(boxes, scores, idxs, 0.6, **kw))
    assert nms(torch.zeros(0, 4, device="cuda"), torch.zeros(0, device="cuda"), 0.5).shape == (0,)
    with pytest.raises(RuntimeError, match="scores are on"):
        nms(boxes.cuda(), scores, 0.5)


@requires_cuda
@pytest.mark.cuda
@needs_torchvision
def test_cuda_matches_torchvision(seed):
    boxes, scores = random_boxes(20000)
    b, s = boxes.cuda(), scores.cuda()
    assert torch.equal(nms(b, s, 0.5), torchvision.ops.nms(b, s, 0.5))
    idxs = torch.randint(0, 80, (20000,), device="cuda")
    assert torch.equal(batched_nms(b, s, idxs, 0.5), torchvision.ops.batched_nms(b, s, idxs, 0.5))


# ---------------------------------------------------------------------------
# Soft-NMS

from instseg_ops.reference import soft_nms_reference  # noqa: E402


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("n", [0, 1, 40, 150])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_soft_nms_matches_reference(seed, method, n, dtype):
    boxes, scores = random_boxes(n, size=150.0, dtype=dtype)
    keep, kept = soft_nms(boxes, scores, 0.3, 0.5, 0.05, method)
    ref_keep, ref_kept = soft_nms_reference(boxes, scores, 0.3, 0.5, 0.05, method)
    assert keep.dtype == torch.int64 and kept.dtype == dtype
    assert torch.equal(keep, ref_keep)
    torch.testing.assert_close(kept, ref_kept, rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(p=problems(), method=st.sampled_from(["linear", "gaussian"]), sigma=st.floats(0.05, 2.0),
       score_thr=st.floats(0.0, 0.5))
def test_soft_nms_properties(p, method, sigma, score_thr):
    boxes, scores, _, thr = p
    keep, kept = soft_nms(boxes, scores, thr, sigma, score_thr, method)
    assert len(set(keep.tolist())) == len(keep)
    assert (kept[1:] <= kept[:-1]).all()  # selection order is by decayed score
    assert (kept <= scores[keep] * (1 + 1e-6)).all()  # scores only decay
    assert (kept >= score_thr).all()
    if method == "linear":
        # With threshold 1 nothing decays: every box above the score threshold, by score.
        keep1, kept1 = soft_nms(boxes, scores, 1.0, sigma, score_thr, "linear")
        above = (scores.double() >= score_thr).nonzero().flatten()  # compared exactly
        assert sorted(keep1.tolist()) == sorted(above.tolist())
        torch.testing.assert_close(kept1, scores[keep1])


def test_soft_nms_bad_inputs():
    boxes, scores = random_boxes(10)
    _, kept = soft_nms(boxes, scores.clone().requires_grad_())
    with pytest.raises(RuntimeError, match="soft_nms is not differentiable"):
        kept.sum().backward()
    scores[2] = float("nan")
    keep, _ = soft_nms(boxes, scores)
    assert 2 not in keep.tolist()
    with pytest.raises(ValueError, match="method"):
        soft_nms(boxes, scores, method="hard")
    with pytest.raises(RuntimeError, match="sigma must be finite and > 0"):
        soft_nms(boxes, scores, sigma=0.0, method="gaussian")
    with pytest.raises(RuntimeError, match="one score per box"):
        soft_nms(boxes, scores[:3])
    opcheck(torch.ops.instseg.soft_nms.default, (boxes, scores, 0.3, 0.5, 0.01, 0))


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("n", [1, 100, 5000])
def test_soft_nms_cuda_matches_cpu(seed, method, n):
    boxes, scores = random_boxes(n)
    keep, kept = soft_nms(boxes, scores, 0.3, 0.5, 0.01, method)
    keep_g, kept_g = soft_nms(boxes.cuda(), scores.cuda(), 0.3, 0.5, 0.01, method)
    assert torch.equal(keep_g.cpu(), keep)
    torch.testing.assert_close(kept_g.cpu(), kept, rtol=1e-5, atol=1e-6)


def test_torch_export_with_data_dependent_output(seed):
    class M(torch.nn.Module):
        def forward(self, b, s, i):
            keep = batched_nms(b, s, i, 0.5)
            return b[keep]

    boxes, scores = random_boxes(200, size=300.0)
    idxs = torch.randint(0, 5, (200,))
    ep = torch.export.export(M(), (boxes, scores, idxs))
    boxes2, scores2 = random_boxes(200, size=150.0)  # same size, other values: another number kept
    idxs2 = torch.randint(0, 5, (200,))
    torch.testing.assert_close(ep.module()(boxes, scores, idxs), M()(boxes, scores, idxs))
    expected = M()(boxes2, scores2, idxs2)
    assert expected.shape[0] != M()(boxes, scores, idxs).shape[0]
    torch.testing.assert_close(ep.module()(boxes2, scores2, idxs2), expected)
