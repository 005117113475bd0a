"""Multi-level (FPN) RoIAlign: level assignment, the fused op, MultiScaleRoIAlign."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

from conftest import requires_cuda
from instseg_ops import MultiScaleRoIAlign, assign_levels, multilevel_roi_align, roi_align
from roi_utils import as_layout, random_rois

try:
    import torchvision
    from torchvision.ops.poolers import LevelMapper
except ImportError:
    torchvision = None

needs_torchvision = pytest.mark.skipif(torchvision is None, reason="torchvision not installed")
LAYOUTS = ["nchw", "channels_last"]
IMG_H, IMG_W = 96, 128
STRIDES = [4, 8, 16, 32]


def pyramid(n=2, c=3, dtype=torch.float32, layout="nchw", strides=STRIDES, device="cpu"):
    return [as_layout(torch.randn(n, c, IMG_H // s, IMG_W // s, dtype=torch.float64).to(dtype), layout).to(device)
            for s in strides]


def image_rois(k, n=2, dtype=torch.float32, malformed=False):
    """Boxes in image pixels, sizes from a few pixels to the whole image."""
    return random_rois(k, n, IMG_H, IMG_W, dtype=dtype, malformed=malformed, margin=0.1)


# ---------------------------------------------------------------------------
# Level assignment


@needs_torchvision
@pytest.mark.parametrize("canonical", [(224, 4), (160, 3), (64, 2)])
def test_fpn_rule_equals_torchvision_levelmapper(seed, canonical):
    scale, level = canonical
    boxes = [image_rois(200)[:, 1:] * 8, image_rois(50)[:, 1:] * 8]
    # Boxes whose sqrt(area) sits exactly on, just below and just above a level boundary.
    edge = []
    for j in range(-3, 4):
        side = scale * 2.0 ** j
        for f in (1.0, 1 - 1e-6, 1 + 1e-6, 1 - 1e-7):
            edge.append([10.0, 10.0, 10.0 + side * f, 10.0 + side])
    boxes.append(torch.tensor(edge))
    mapper = LevelMapper(2, 5, canonical_scale=scale, canonical_level=level)
    ours = assign_levels(boxes, 2, 5, "fpn", canonical_scale=scale, canonical_level=level)
    assert ours.dtype == torch.int64
    assert torch.equal(ours, mapper(boxes))


def test_scale_adaptive_rule_equals_reference(seed):
    image_sizes = [(800, 1216), (640, 480)]
    rois = torch.cat([random_rois(300, 2, 800, 1216, dtype=torch.float64), ], dim=0)
    # Exact boundaries: box area = image area / 2^j.
    exact = []
    for j in range(0, 12):
        area = 800 * 1216 / 2.0 ** j
        exact.append([0, 0.0, 0.0, area / 100.0, 100.0])
    rois = torch.cat([rois, torch.tensor(exact, dtype=torch.float64)])
    levels = assign_levels(rois, 3, 7, "scale_adaptive", image_sizes=image_sizes)
    for k in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[k].tolist()
        h, w = image_sizes[int(b)]
        area = (x2 - x1) * (y2 - y1)
        expect = math.ceil(7 - math.log2(h * w / area)) if area > 0 else 3
        assert levels[k].item() == min(max(expect, 3), 7) - 3, (k, rois[k])


def test_scale_adaptive_rule_in_half_precision_and_with_bad_batch_indices(seed):
    """float16 boxes: the image area 800 x 1216 overflows float16, so the rule computes in
    float32 and gives the float32 boxes' levels. A NaN or out-of-range batch index must not
    index out of bounds in the rule; the op then rejects it."""
    image_sizes = [(800, 1216), (640, 480)]
    rois = random_rois(200, 2, 800, 1216)
    half = rois.half()
    assert torch.equal(assign_levels(half, 2, 5, "scale_adaptive", image_sizes=image_sizes),
                       assign_levels(half.float(), 2, 5, "scale_adaptive", image_sizes=image_sizes))
    boxes = [half[:7, 1:], half[7:9, 1:]]
    assert torch.equal(assign_levels(boxes, 2, 5, "scale_adaptive", image_sizes=image_sizes),
                       assign_levels([b.float() for b in boxes], 2, 5, "scale_adaptive", image_sizes=image_sizes))
    feats = [torch.randn(2, 3, 800 // s, 1216 // s) for s in (4, 8, 16, 32)]
    for bad in (float("nan"), 2.0, -1.0):
        r = rois[:5].clone()
        r[1, 0] = bad
        with pytest.raises(RuntimeError, match="batch index"):
            multilevel_roi_align(feats, r, 2, [1 / 4, 1 / 8, 1 / 16, 1 / 32], rule="scale_adaptive",
                                 image_sizes=image_sizes)


def test_assign_levels_inputs():
    rois = random_rois(10, 2, 64, 64)
    a = assign_levels(rois, 2, 5)
    assert torch.equal(a, assign_levels(rois[:, 1:], 2, 5))
    nan_box = torch.tensor([[0.0, float("nan"), 0.0, 4.0, 4.0]])
    assert assign_levels(nan_box, 2, 5).tolist() == [0]
    assert assign_levels(torch.tensor([[0.0, 3.0, 3.0, 3.0, 3.0]]), 2, 5).tolist() == [0]
    with pytest.raises(ValueError, match="rule"):
        assign_levels(rois, 2, 5, "nearest")
    with pytest.raises(ValueError, match="image_sizes"):
        assign_levels(rois, 2, 5, "scale_adaptive")


# ---------------------------------------------------------------------------
# The fused op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
def test_equals_per_level_loop_of_roi_align(seed, dtype, layout, aligned):
    feats = pyramid(dtype=dtype, layout=layout)
    rois = image_rois(60, dtype=dtype, malformed=True)
    scales = [1.0 / s for s in STRIDES]
    levels = torch.randint(0, 4, (60,))
    xs = [f.clone().requires_grad_() for f in feats]
    out = multilevel_roi_align(xs, rois, (5, 4), scales, -1, aligned, levels)
    assert out.shape == (60, 3, 5, 4)
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last)
    ys = [f.clone().requires_grad_() for f in feats]
    ref = torch.empty_like(out)
    for k in range(60):
        lev = int(levels[k])
        ref[k:k + 1] = roi_align(ys[lev], rois[k:k + 1], (5, 4), scales[lev], -1, aligned)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12 if dtype == torch.float64 else 1e-5, atol=1e-6)
        if layout == "channels_last":
            assert a.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_types(seed, dtype):
    feats = pyramid(dtype=dtype)
    rois = image_rois(30)
    out = multilevel_roi_align(feats, rois, 7, [1.0 / s for s in STRIDES], 2)
    ref = multilevel_roi_align([f.float() for f in feats], rois, 7, [1.0 / s for s in STRIDES], 2)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


@needs_torchvision
@pytest.mark.parametrize("canonical", [(224, 4), (64, 3)])
@pytest.mark.parametrize("output_size", [7, (14, 14)])
def test_module_matches_torchvision_multiscaleroialign(seed, canonical, output_size):
    names = ["p2", "p3", "p4", "p5"]
    feats = pyramid(n=2, c=4)
    x = dict(zip(names, feats))
    x["other"] = torch.randn(2, 4, 3, 3)  # not in featmap_names: ignored
    boxes = [image_rois(40)[:, 1:] * 1.0, image_rois(25)[:, 1:]]
    image_shapes = [(IMG_H, IMG_W), (IMG_H - 10, IMG_W - 20)]
    kw = dict(canonical_scale=canonical[0], canonical_level=canonical[1])
    ours = MultiScaleRoIAlign(names, output_size, 2, **kw)
    ref = torchvision.ops.MultiScaleRoIAlign(names, output_size, 2, **kw)
    xa = {k: v.clone().requires_grad_() for k, v in x.items()}
    xb = {k: v.clone().requires_grad_() for k, v in x.items()}
    a = ours(xa, boxes, image_shapes)
    b = ref(xb, boxes, image_shapes)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    a.backward(g)
    b.backward(g)
    for k in names:
        torch.testing.assert_close(xa[k].grad, xb[k].grad, rtol=1e-5, atol=1e-5)
    # A single level falls back to roi_align, as in torchvision.
    one = MultiScaleRoIAlign(["p3"], 5, 2)(x, boxes, image_shapes)
    torch.testing.assert_close(one, torchvision.ops.MultiScaleRoIAlign(["p3"], 5, 2)(x, boxes, image_shapes))
    assert "rule='fpn'" in repr(ours)
    # torchvision takes the listed maps in the input's order and ignores names it lacks.
    for listed in (["p5", "p3", "p2", "p4"], names + ["missing"]):
        torch.testing.assert_close(MultiScaleRoIAlign(listed, output_size, 2, **kw)(x, boxes, image_shapes),
                                   torchvision.ops.MultiScaleRoIAlign(listed, output_size, 2, **kw)(x, boxes, image_shapes),
                                   rtol=1e-5, atol=1e-5)


def test_scale_adaptive_module_uses_image_sizes(seed):
    names = ["p3", "p4", "p5"]
    feats = pyramid(strides=[8, 16, 32])
    boxes = [image_rois(20)[:, 1:], image_rois(10)[:, 1:]]
    image_shapes = [(IMG_H, IMG_W), (IMG_H // 2, IMG_W // 2)]
    out = MultiScaleRoIAlign(names, 4, 2, rule="scale_adaptive")(dict(zip(names, feats)), boxes, image_shapes)
    levels = assign_levels(boxes, 3, 5, "scale_adaptive", image_sizes=image_shapes)
    ref = multilevel_roi_align(feats, boxes, 4, [1 / 8, 1 / 16, 1 / 32], 2, levels=levels)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck(seed, layout):
    feats = [f.requires_grad_() for f in pyramid(c=2, dtype=torch.float64, layout=layout, strides=[16, 32])]
    rois = image_rois(6, dtype=torch.float64)
    levels = torch.randint(0, 2, (6,))

    def f(a, b):
        return multilevel_roi_align([a, b], rois, (2, 3), [1 / 16, 1 / 32], 2, True, levels)

    assert torch.autograd.gradcheck(f, tuple(feats))
    assert torch.autograd.gradgradcheck(f, tuple(feats))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_opcheck(layout):
    torch.manual_seed(0)
    feats = [f.requires_grad_() for f in pyramid(layout=layout)]
    rois = image_rois(12)
    levels = torch.randint(0, 4, (12,))
    scales = [1.0 / s for s in STRIDES]
    opcheck(torch.ops.instseg.multilevel_roi_align.default, (feats, rois, levels, scales, 3, 3, 2, False, False))
    sizes = [2, 3] + [v for f in feats for v in f.shape[2:]]
    grad = torch.randn(12, 3, 3, 3)
    opcheck(torch.ops.instseg._multilevel_roi_align_backward.default,
            (grad, rois, levels, scales, 3, 3, sizes, 2, False, layout == "channels_last", False))


def test_torch_compile_fullgraph_with_level_assignment(seed):
    torch._dynamo.reset()
    scales = [1.0 / s for s in STRIDES]

    def f(feats, rois):
        return multilevel_roi_align(feats, rois, 3, scales, 2).square().sum()

    feats = [x.requires_grad_() for x in pyramid(dtype=torch.float64)]
    rois = image_rois(20, dtype=torch.float64)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(feats, rois)
    grads = torch.autograd.grad(loss, feats)
    feats2 = [x.detach().clone().requires_grad_() for x in feats]
    loss2 = f(feats2, rois)
    grads2 = torch.autograd.grad(loss2, feats2)
    torch.testing.assert_close(loss, loss2)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


def test_torch_export(seed):
    names = ["p2", "p3", "p4", "p5"]

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = MultiScaleRoIAlign(names, 3, 2)

        def forward(self, p2, p3, p4, p5, b0, b1):
            return self.pool({"p2": p2, "p3": p3, "p4": p4, "p5": p5}, [b0, b1], [(IMG_H, IMG_W)] * 2)

    feats = pyramid()
    boxes = [image_rois(7)[:, 1:], image_rois(5)[:, 1:]]
    ep = torch.export.export(M(), (*feats, *boxes))
    torch.testing.assert_close(ep.module()(*feats, *boxes), M()(*feats, *boxes))


def test_bad_inputs():
    feats = pyramid()
    rois = image_rois(5)
    levels = torch.zeros(5, dtype=torch.int64)
    scales = [1.0 / s for s in STRIDES]
    op = torch.ops.instseg.multilevel_roi_align
    with pytest.raises(RuntimeError, match="spatial_scales"):
        op(feats, rois, levels, scales[:3], 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="agree on N and C"):
        op([feats[0], feats[1][:1]], rois, levels, scales[:2], 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="agree on N and C"):
        op([feats[0], feats[1][:, :2]], rois, levels, scales[:2], 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="one dtype"):
        op([feats[0], feats[1].double()], rois, levels, scales[:2], 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="levels must be a Tensor"):
        op(feats, rois, levels[:3], scales, 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="int64"):
        op(feats, rois, levels.int(), scales, 2, 2, 2, False)
    for bad in (-1, 4):
        with pytest.raises(RuntimeError, match="not a valid level index"):
            op(feats, rois, torch.full((5,), bad, dtype=torch.int64), scales, 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="1 to 8 feature maps"):
        op(feats * 3, rois, levels, scales * 3, 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="sampling_ratio must be <= 1024"):
        op(feats, rois, levels, scales, 2, 2, 5000, False)
    with pytest.raises(RuntimeError, match="spatial_scale must be finite"):
        op(feats, rois, levels, scales[:3] + [float("inf")], 2, 2, 2, False)
    with pytest.raises(RuntimeError, match="batch index"):
        r = rois.clone()
        r[0, 0] = 5
        op(feats, r, levels, scales, 2, 2, 2, False)


def test_empty_and_mixed_layouts(seed):
    feats = pyramid()
    scales = [1.0 / s for s in STRIDES]
    out = multilevel_roi_align(feats, torch.zeros(0, 5), 3, scales)
    assert out.shape == (0, 3, 3, 3)
    mixed = [feats[0], as_layout(feats[1], "channels_last"), feats[2], feats[3]]
    rois = image_rois(10)
    torch.testing.assert_close(multilevel_roi_align(mixed, rois, 3, scales), multilevel_roi_align(feats, rois, 3, scales))


# ---------------------------------------------------------------------------
# Properties


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), k=st.integers(1, 30), data=st.data())
def test_permuting_rois_permutes_outputs(seed, k, data):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(2, 2, IMG_H // s, IMG_W // s, generator=g) for s in STRIDES]
    rois = random_rois(k, 2, IMG_H, IMG_W, generator=g)
    perm = torch.tensor(data.draw(st.permutations(range(k))))
    scales = [1.0 / s for s in STRIDES]
    a = multilevel_roi_align(feats, rois, 3, scales, 2)
    b = multilevel_roi_align(feats, rois[perm], 3, scales, 2)
    assert torch.equal(a[perm], b)


@settings(max_examples=200, deadline=None)
@given(x1=st.floats(0, 1000), y1=st.floats(0, 1000), w=st.floats(1, 2000), h=st.floats(1, 2000),
       rule=st.sampled_from(["fpn", "scale_adaptive"]))
def test_doubling_boxes_moves_levels_up(x1, y1, w, h, rule):
    """Doubling a box's sides moves it one level up under the fpn rule (sqrt of
    the area doubles) and two under scale_adaptive (the area quadruples)."""
    box = torch.tensor([[0.0, x1, y1, x1 + w, y1 + h]], dtype=torch.float64)
    big = box.clone()
    big[:, 1:] *= 2
    kw = dict(image_sizes=[(4000, 4000)]) if rule == "scale_adaptive" else {}
    step = 1 if rule == "fpn" else 2
    # Levels clamped only at the top (max_level enters the scale_adaptive formula).
    raw = assign_levels(box, -100, 6, rule, **kw).item() - 100
    assert assign_levels(big, -100, 6, rule, **kw).item() - 100 == min(raw + step, 6)
    assert assign_levels(big, 2, 6, rule, **kw).item() == max(min(raw + step, 6), 2) - 2


# ---------------------------------------------------------------------------
# CUDA


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_cpu(seed, dtype, layout, deterministic):
    feats = pyramid(dtype=dtype, layout=layout)
    rois = image_rois(80, malformed=True)
    scales = [1.0 / s for s in STRIDES]
    xc = [f.clone().requires_grad_() for f in feats]
    xg = [f.cuda().requires_grad_() for f in feats]
    a = multilevel_roi_align(xc, rois, 5, scales, -1)
    b = multilevel_roi_align(xg, rois.cuda(), 5, scales, -1, deterministic=deterministic)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(b.cpu().double(), a.double(), rtol=tol, atol=tol)
    g = torch.randn(a.shape, dtype=torch.float64).to(dtype)
    a.backward(g)
    b.backward(g.cuda())
    for u, v in zip(xc, xg):
        torch.testing.assert_close(v.grad.cpu().double(), u.grad.double(), rtol=4 * tol, atol=4 * tol)


@requires_cuda
@pytest.mark.cuda
def test_cuda_invalid_indices_raise_and_give_zeros_in_a_graph(seed):
    """Eagerly, bad level or batch indices raise as on the CPU; inside a CUDA graph (where the
    check's device-to-host copy is skipped) the kernel gives those RoIs zeros."""
    feats = pyramid(device="cuda")
    scales = [1.0 / s for s in STRIDES]
    op = torch.ops.instseg.multilevel_roi_align
    rois = image_rois(6).cuda()
    good = torch.tensor([0, 1, 1, 0, 2, 3], device="cuda")
    for bad in (7, -1):
        levels = good.clone()
        levels[2] = bad
        with pytest.raises(RuntimeError, match="valid level index"):
            op(feats, rois, levels, scales, 3, 3, 2, False)
    r = rois.clone()
    r[1, 0] = 2
    with pytest.raises(RuntimeError, match="batch indices"):
        op(feats, r, good, scales, 3, 3, 2, False)
    expected = op(feats, rois, good, scales, 3, 3, 2, False)
    levels = good.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op(feats, rois, levels, scales, 3, 3, 2, False)
    levels.copy_(torch.tensor([0, 1, 7, -1, 2, 3], device="cuda"))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert (out[2:4] == 0).all()
    assert torch.equal(out[[0, 1, 4, 5]], expected[[0, 1, 4, 5]])
