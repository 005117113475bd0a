"""Mask pasting on the CPU: torchvision mode, aligned (detectron2) mode, threshold, properties."""
import pytest
import torch
import torch.nn.functional as F
from torch.library import opcheck

from instseg_ops import paste_masks, paste_masks_crops

try:
    from torchvision.models.detection.roi_heads import paste_masks_in_image
except ImportError:
    paste_masks_in_image = None

needs_torchvision = pytest.mark.skipif(paste_masks_in_image is None, reason="torchvision not installed")


def grid_sample_reference(masks, boxes, h, w):
    """detectron2's pasting, from its description: pixel centres (+0.5) mapped into each box,
    sampled with grid_sample(align_corners=False, zeros outside)."""
    x0, y0, x1, y1 = (boxes[:, i:i + 1].float() for i in range(4))
    gy = ((torch.arange(h, dtype=torch.float32) + 0.5) - y0) / (y1 - y0) * 2 - 1
    gx = ((torch.arange(w, dtype=torch.float32) + 0.5) - x0) / (x1 - x0) * 2 - 1
    n = boxes.shape[0]
    grid = torch.stack([gx[:, None, :].expand(n, h, w), gy[:, :, None].expand(n, h, w)], dim=3)
    return F.grid_sample(masks[:, None].float(), grid, align_corners=False)[:, 0]


def random_case(n=30, m=28, h=120, w=160, tiny=False):
    masks = torch.rand(n, m, m)
    xy = torch.rand(n, 2) * torch.tensor([w + 40.0, h + 40.0]) - 20  # some partly outside
    wh = torch.rand(n, 2) * (3 if tiny else 200) + 0.1
    boxes = torch.cat([xy, xy + wh], dim=1)
    return masks, boxes


@needs_torchvision
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("m", [1, 7, 28])
def test_matches_torchvision(seed, padding, tiny, m):
    masks, boxes = random_case(m=m, tiny=tiny)
    out = paste_masks(masks, boxes, (120, 160), padding)
    for i in range(masks.shape[0]):
        try:
            ref = paste_masks_in_image(masks[i:i + 1, None], boxes[i:i + 1], (120, 160), padding)[0, 0]
        except RuntimeError:  # torchvision fails on boxes wholly outside the image; ours pastes nothing
            assert (out[i] == 0).all()
            continue
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=2e-6)
    assert torch.equal(paste_masks(masks[:, None], boxes, (120, 160), padding), out)


@pytest.mark.parametrize("tiny", [False, True])
def test_aligned_mode_matches_grid_sample_reference(seed, tiny):
    masks, boxes = random_case(tiny=tiny)
    out = paste_masks(masks, boxes, (120, 160), aligned=True)
    torch.testing.assert_close(out, grid_sample_reference(masks, boxes, 120, 160), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_threshold_is_exactly_greater_or_equal(seed, aligned, dtype):
    masks, boxes = random_case()
    masks = masks.to(dtype)
    prob = paste_masks(masks, boxes, (120, 160), aligned=aligned)
    assert prob.dtype == dtype
    for t in (0.0, 0.3, 0.5):
        binary = paste_masks(masks, boxes, (120, 160), threshold=t, aligned=aligned)
        assert binary.dtype == torch.bool
        # >= on the float value before rounding to dtype: compare with the float32 canvas.
        ref = paste_masks(masks.float(), boxes, (120, 160), aligned=aligned) >= t
        assert torch.equal(binary, ref)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("size", [(120, 157), (1100, 2003)])  # odd widths; the second is lazily zeroed
def test_reduced_precision_output_is_the_rounded_float32_paste(seed, aligned, dtype, size):
    # Values in float32 are rounded once to the output dtype (float16 rows go through a vector
    # conversion where the CPU has one): equal, bit for bit, to torch's own rounding, including
    # overflow to inf, subnormals and signed zeros.
    h, w = size
    masks, boxes = random_case(n=12, h=h, w=w)
    boxes[:, 2:] = boxes[:, :2] + (boxes[:, 2:] - boxes[:, :2]) * (w / 200)
    scale = torch.tensor([1.0, 7e4, 1e-6, -3e-5, 1e-8, 65519.0])[torch.arange(12) % 6]
    masks = (masks * 2 - 0.5) * scale[:, None, None]
    masks = masks.to(dtype)
    out = paste_masks(masks, boxes, (h, w), aligned=aligned)
    ref = paste_masks(masks.float(), boxes, (h, w), aligned=aligned).to(dtype)
    assert out.dtype == dtype
    assert torch.equal(out.view(torch.int16), ref.view(torch.int16))
    crops, regions = paste_masks_crops(masks, boxes, (h, w), aligned=aligned)
    for i in range(12):
        x0, y0, x1, y1 = regions[i].tolist()
        assert torch.equal(crops[i].view(torch.int16), out[i, y0:y1, x0:x1].view(torch.int16))


def test_ones_mask_pastes_exactly_its_clipped_integer_box(seed):
    for _ in range(20):
        x0, y0 = torch.randint(-10, 100, (2,)).tolist()
        bw, bh = torch.randint(1, 80, (2,)).tolist()
        box = torch.tensor([[x0, y0, x0 + bw, y0 + bh]], dtype=torch.float32)
        out = paste_masks(torch.ones(1, 16, 16), box, (90, 110), padding=0)[0]
        ref = torch.zeros(90, 110)
        ye, xe = max(min(y0 + bh + 1, 90), 0), max(min(x0 + bw + 1, 110), 0)  # no negative slice ends
        ref[max(y0, 0):ye, max(x0, 0):xe] = 1
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("aligned", [False, True])
def test_translation_and_flip(seed, aligned):
    masks = torch.rand(5, 14, 14)
    boxes = torch.rand(5, 2) * 40 + 20
    boxes = torch.cat([boxes, boxes + torch.rand(5, 2) * 30 + 2], dim=1)
    out = paste_masks(masks, boxes, (100, 120), aligned=aligned)
    dy, dx = 7, 11
    moved = paste_masks(masks, boxes + torch.tensor([dx, dy, dx, dy]), (100, 120), aligned=aligned)
    # Float coordinates near 100 round differently once shifted: a few ulps of difference.
    torch.testing.assert_close(moved[:, dy:, dx:], out[:, :100 - dy, :120 - dx], rtol=1e-4, atol=1e-5)
    if aligned:  # mirror in x: x -> W - x maps the box [x0, x1] to [W - x1, W - x0]
        flipped_boxes = torch.stack([120 - boxes[:, 2], boxes[:, 1], 120 - boxes[:, 0], boxes[:, 3]], dim=1)
        flipped = paste_masks(masks.flip(-1), flipped_boxes, (100, 120), aligned=True)
        torch.testing.assert_close(flipped, out.flip(-1), rtol=1e-4, atol=1e-5)


def test_empty_bad_and_nonfinite_inputs():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), (10, 20)).shape == (0, 10, 20)
    masks, boxes = random_case(n=3)
    boxes[1, 2] = float("nan")
    boxes[2] = torch.tensor([-500.0, -500.0, -400.0, -400.0])  # wholly above/left: nothing
    out = paste_masks(masks, boxes, (120, 160))
    assert (out[1] == 0).all() and (out[2] == 0).all()
    assert (paste_masks(masks, boxes, (120, 160), aligned=True)[1] == 0).all()
    with pytest.raises(RuntimeError, match="one box per mask"):
        paste_masks(masks, boxes[:2], (10, 10))
    with pytest.raises(RuntimeError, match=r"Tensor\[N, M, M\]"):
        paste_masks(masks[:, :, :5], boxes, (10, 10))
    with pytest.raises(RuntimeError, match="negative image size"):
        paste_masks(masks, boxes, (-1, 10))
    with pytest.raises(ValueError, match="masks must be"):
        paste_masks(masks[:, None].expand(3, 2, 28, 28), boxes, (10, 10))


@needs_torchvision
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("tiny", [False, True])
def test_gradients_match_torchvision(seed, padding, tiny):
    """torchvision's paste is differentiable with respect to the masks; so is ours, with the
    same gradients (to float rounding). Boxes get no gradient, as there."""
    masks, boxes = random_case(25, tiny=tiny)
    g = torch.randn(25, 120, 160)
    ours = masks.clone().requires_grad_()
    (paste_masks(ours, boxes, (120, 160), padding) * g).sum().backward()
    ref = masks.clone().requires_grad_()
    pasted = 0
    for i in range(25):
        try:
            out = paste_masks_in_image(ref[i:i + 1, None], boxes[i:i + 1], (120, 160), padding)[0, 0]
        except RuntimeError:  # torchvision fails on boxes wholly outside the image; ours pastes nothing
            continue
        (out * g[i]).sum().backward()
        pasted += 1
    assert pasted > 10
    ref_grad = torch.zeros_like(masks) if ref.grad is None else ref.grad
    torch.testing.assert_close(ours.grad, ref_grad, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("tiny", [False, True])
def test_aligned_gradients_match_grid_sample_reference(seed, tiny):
    masks, boxes = random_case(25, tiny=tiny)
    g = torch.randn(25, 120, 160)
    ours = masks.clone().requires_grad_()
    (paste_masks(ours, boxes, (120, 160), aligned=True) * g).sum().backward()
    ref = masks.clone().requires_grad_()
    (grid_sample_reference(ref, boxes, 120, 160) * g).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_gradients_are_the_adjoint_and_crops_agree(seed, aligned, dtype):
    """Pasting is linear in the masks: <paste(m), G> = <m, grad(G)>. The crop form gives the
    same gradients; boxes that paste nothing (non-finite, outside) get zero gradients."""
    masks, boxes = random_case(20)
    boxes[3, 0] = float("nan")
    boxes[4] = torch.tensor([500.0, 500.0, 600.0, 600.0])
    masks = masks.to(dtype)
    g = torch.randn(20, 120, 160, dtype=torch.float64)
    m = masks.clone().requires_grad_()
    out = paste_masks(m, boxes, (120, 160), 1, aligned=aligned)
    (out.double() * g).sum().backward()
    lhs = (out.double() * g).sum()
    rhs = (masks.double() * m.grad.double()).sum()
    if dtype == torch.float64:
        tol = 1e-5 * max(1.0, float(lhs.abs()))
    else:
        # each pasted value and each gradient is a float32 result rounded once to float16 (a
        # relative error of at most 2^-11, about 2^-11 / sqrt(3) on average), so the two sums
        # differ by independent roundings: 4 x 2^-11 x the l2 norm of their terms is about 7
        # standard deviations (over 402 seeded cases the largest difference was 1.7 x 2^-11 x
        # that norm; the sum of magnitudes, a strict bound, is too loose to catch a wrong gradient)
        terms = torch.cat([(out.detach().double() * g).flatten(), (masks.double() * m.grad.double()).flatten()])
        tol = 4 * 2.0 ** -11 * float(terms.norm())
    torch.testing.assert_close(lhs, rhs, rtol=0, atol=tol)
    assert m.grad.dtype == dtype and (m.grad[[3, 4]] == 0).all()
    mc = masks.clone().requires_grad_()
    crops, regions = paste_masks_crops(mc, boxes, (120, 160), 1, aligned=aligned)
    total = sum((c.double() * g[n, r[1]:r[3], r[0]:r[2]]).sum() for n, (c, r) in enumerate(zip(crops, regions.tolist())))
    total.backward()
    assert torch.equal(mc.grad, m.grad)
    empty = torch.zeros(0, 28, 28, dtype=dtype, requires_grad=True)
    paste_masks(empty, torch.zeros(0, 4), (120, 160)).sum().backward()
    assert empty.grad.shape == (0, 28, 28)


def jacobian_reference(masks, boxes, h, w, padding, aligned):
    """The paste's Jacobian from the forward alone: pasting is linear in the masks, so pasting the
    unit mask of cell (i, j) gives every pixel's weight on that cell. float64 [N, M, M, H, W]."""
    n, m = masks.shape[0], masks.shape[1]
    jac = torch.zeros(n, m, m, h, w, dtype=torch.float64)
    for i in range(m):
        for j in range(m):
            unit = torch.zeros(n, m, m)
            unit[:, i, j] = 1
            jac[:, i, j] = torch.ops.instseg.paste_masks(unit, boxes, h, w, padding, None, aligned).double()
    return jac


GRAD_TOL = {torch.float64: 1e-6, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("aligned", [False, True])
def test_backward_ops_match_the_forward_jacobian(seed, dtype, aligned):
    """Both backward ops, every dtype and padding, against <Jacobian column, G> computed in
    float64 from unit-mask pastes; boxes that paste nothing (NaN, outside, huge) included.
    Outputs are poisoned (NaN) before the kernels write them."""
    n, m, h, w = 10, 7, 50, 70
    masks, boxes = random_case(n=n, m=m, h=h, w=w)
    boxes[2, 1] = float("nan")
    boxes[3] = torch.tensor([400.0, 400.0, 500.0, 500.0])
    boxes[4] = torch.tensor([-1e7, -3e6, 2e7, 1e7])  # every pixel on one or two cells per axis
    boxes[5] = torch.tensor([3.0, 4.0, 3.5, 30.0])   # thinner than a pixel
    masks = masks.to(dtype)
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        for padding in (0, 1, 2):
            jac = jacobian_reference(masks, boxes, h, w, padding, aligned)
            g = torch.randn(n, h, w, dtype=torch.float64).to(dtype)
            ref = torch.einsum("nijyx,nyx->nij", jac, g.double())
            got = torch.ops.instseg._paste_masks_backward(g, masks, boxes, h, w, padding, aligned)
            assert got.dtype == dtype and got.shape == masks.shape and got.is_contiguous()
            tol = GRAD_TOL[dtype]
            torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))
            assert (got[[2, 3]] == 0).all()
            # The crop form: the same numbers from the region pixels only.
            data, regions, offsets = torch.ops.instseg.paste_masks_crops(masks, boxes, h, w, padding, None, aligned)
            gd = torch.cat([g[k, r[1]:r[3], r[0]:r[2]].flatten() for k, r in enumerate(regions.tolist())])
            got_crops = torch.ops.instseg._paste_masks_crops_backward(gd, masks, boxes, regions, offsets, h, w,
                                                                      padding, aligned)
            assert torch.equal(got_crops, got)
            # Deterministic: the same bits again.
            assert torch.equal(torch.ops.instseg._paste_masks_backward(g, masks, boxes, h, w, padding, aligned), got)
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]


def test_backward_ops_layouts_errors_and_empty(seed):
    masks, boxes = random_case(n=6, m=9, h=40, w=50)
    g = torch.randn(6, 40, 50)
    want = torch.ops.instseg._paste_masks_backward(g, masks, boxes, 40, 50, 1, False)
    # Non-contiguous gradient and masks (only the masks' shape and dtype matter): same result, contiguous.
    g_t = g.transpose(1, 2).contiguous().transpose(1, 2)
    got = torch.ops.instseg._paste_masks_backward(g_t, masks.transpose(1, 2), boxes.double(), 40, 50, 1, False)
    assert torch.equal(got, want) and got.is_contiguous()
    with pytest.raises(RuntimeError, match="gradient must be a Tensor"):
        torch.ops.instseg._paste_masks_backward(g[:, :30], masks, boxes, 40, 50, 1, False)
    with pytest.raises(RuntimeError, match="the gradient is Double but the masks are Float"):
        torch.ops.instseg._paste_masks_backward(g.double(), masks, boxes, 40, 50, 1, False)
    data, regions, offsets = torch.ops.instseg.paste_masks_crops(masks, boxes, 40, 50, 1, None, False)
    gd = torch.randn_like(data)
    bad = regions.clone()
    bad[1, 0] += 1
    with pytest.raises(RuntimeError, match="region .* of mask 1 differs from the geometry's"):
        torch.ops.instseg._paste_masks_crops_backward(gd, masks, boxes, bad, offsets, 40, 50, 1, False)
    bad = offsets.clone()
    bad[2] += 1
    with pytest.raises(RuntimeError, match="offsets of mask 1 span"):
        torch.ops.instseg._paste_masks_crops_backward(gd, masks, boxes, regions, bad, 40, 50, 1, False)
    with pytest.raises(RuntimeError, match="the gradient has"):
        torch.ops.instseg._paste_masks_crops_backward(gd[:-1], masks, boxes, regions, offsets, 40, 50, 1, False)
    with pytest.raises(RuntimeError, match="regions must be an int64"):
        torch.ops.instseg._paste_masks_crops_backward(gd, masks, boxes, regions.int(), offsets, 40, 50, 1, False)
    # Empty inputs: no masks, an empty image, no crop pixels.
    e = torch.ops.instseg._paste_masks_backward(torch.zeros(0, 40, 50), torch.zeros(0, 9, 9), torch.zeros(0, 4),
                                                40, 50, 1, True)
    assert e.shape == (0, 9, 9)
    e = torch.ops.instseg._paste_masks_backward(torch.zeros(6, 0, 50), masks, boxes, 0, 50, 1, False)
    assert torch.equal(e, torch.zeros_like(masks))
    far = torch.tensor([[100.0, 100.0, 120.0, 120.0]]).repeat(6, 1)
    data, regions, offsets = torch.ops.instseg.paste_masks_crops(masks, far, 40, 50, 1, None, True)
    e = torch.ops.instseg._paste_masks_crops_backward(data, masks, far, regions, offsets, 40, 50, 1, True)
    assert torch.equal(e, torch.zeros_like(masks))


@pytest.mark.parametrize("aligned", [False, True])
def test_double_backward_is_the_paste(seed, aligned):
    """The backward is linear in its incoming gradient G: d<backward(G), H>/dG = paste(H)."""
    masks, boxes = random_case(n=5, m=6, h=30, w=40)
    g = torch.randn(5, 30, 40, requires_grad=True)
    hh = torch.randn(5, 6, 6)
    out = torch.ops.instseg._paste_masks_backward(g, masks, boxes, 30, 40, 1, aligned)
    (dg,) = torch.autograd.grad((out * hh).sum(), g)
    assert torch.equal(dg, torch.ops.instseg.paste_masks(hh, boxes, 30, 40, 1, None, aligned))
    data, regions, offsets = torch.ops.instseg.paste_masks_crops(masks, boxes, 30, 40, 1, None, aligned)
    gd = torch.randn_like(data).requires_grad_()
    out = torch.ops.instseg._paste_masks_crops_backward(gd, masks, boxes, regions, offsets, 30, 40, 1, aligned)
    (dg,) = torch.autograd.grad((out * hh).sum(), gd)
    assert torch.equal(dg, torch.ops.instseg.paste_masks_crops(hh, boxes, 30, 40, 1, None, aligned)[0])
    # Through the public function: second derivatives of a loss quadratic in the paste.
    m = masks.clone().requires_grad_()
    (gm,) = torch.autograd.grad((paste_masks(m, boxes, (30, 40), aligned=aligned) ** 2).sum(), m, create_graph=True)
    (ggm,) = torch.autograd.grad((gm * hh).sum(), m)
    pasted = paste_masks(hh, boxes, (30, 40), aligned=aligned)
    want = torch.ops.instseg._paste_masks_backward(2 * pasted, masks, boxes, 30, 40, 1, aligned)
    torch.testing.assert_close(ggm, want, rtol=1e-5, atol=1e-5)


def test_backward_ops_and_compile(seed):
    masks, boxes = random_case(6)
    g = torch.randn(6, 120, 160)
    small, small_boxes = random_case(4, m=10, h=40, w=50)
    for dtype, aligned in ((torch.float32, False), (torch.float16, True), (torch.float64, False)):
        opcheck(torch.ops.instseg._paste_masks_backward.default,
                (torch.randn(4, 40, 50, dtype=dtype), small.to(dtype), small_boxes, 40, 50, 1, aligned))
        data, regions, offsets = torch.ops.instseg.paste_masks_crops(small.to(dtype), small_boxes, 40, 50, 1, None,
                                                                     aligned)
        opcheck(torch.ops.instseg._paste_masks_crops_backward.default,
                (torch.randn_like(data), small.to(dtype), small_boxes, regions, offsets, 40, 50, 1, aligned))
    eager = masks.clone().requires_grad_()
    (paste_masks(eager, boxes, (120, 160)) * g).sum().backward()
    compiled = masks.clone().requires_grad_()
    torch._dynamo.reset()
    loss = torch.compile(lambda m, b: (paste_masks(m, b, (120, 160)) * g).sum(), fullgraph=True,
                         backend="aot_eager")(compiled, boxes)
    loss.backward()
    assert torch.equal(compiled.grad, eager.grad)
    with torch.no_grad():
        assert not paste_masks(masks.requires_grad_(), boxes, (120, 160)).requires_grad


def test_opcheck_and_compile(seed):
    masks, boxes = random_case(n=4)
    opcheck(torch.ops.instseg.paste_masks.default, (masks, boxes, 50, 60, 1, None, False))
    opcheck(torch.ops.instseg.paste_masks.default, (masks, boxes, 50, 60, 1, 0.5, True))
    torch._dynamo.reset()

    def f(m, b):
        return paste_masks(m, b, (50, 60), threshold=0.5).sum()

    assert torch.compile(f, fullgraph=True, backend="aot_eager")(masks, boxes) == f(masks, boxes)


@needs_torchvision
def test_huge_boxes_match_torchvision(seed):
    masks = torch.rand(4, 28, 28)
    boxes = torch.tensor([[-900.0, -700.0, 1100.0, 900.0], [50.0, -1500.0, 60.0, 1600.0],
                          [-2000.0, 30.0, 2100.0, 40.0], [10.0, 10.0, 2000.0, 1500.0]])
    boxes += torch.rand(4, 4)
    out = paste_masks(masks, boxes, (120, 160))
    for i in range(4):
        ref = paste_masks_in_image(masks[i:i + 1, None], boxes[i:i + 1], (120, 160), 1)[0, 0]
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("aligned", [False, True])
def test_every_crop_element_is_written(seed, aligned):
    # fill_uninitialized_memory poisons the crop buffer (NaN) before the kernel runs.
    masks, boxes = random_case()
    canvas = paste_masks(masks, boxes, (120, 160), aligned=aligned)
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        crops, regions = paste_masks_crops(masks, boxes, (120, 160), aligned=aligned)
    finally:
        torch.use_deterministic_algorithms(old[0])
        torch.utils.deterministic.fill_uninitialized_memory = old[1]
    for n, (x0, y0, x1, y1) in enumerate(regions.tolist()):
        assert not crops[n].isnan().any()
        assert torch.equal(crops[n], canvas[n, y0:y1, x0:x1])


def test_large_canvas_is_zero_outside_the_boxes(seed):
    # Large outputs come from lazily zeroed memory: check every element.
    masks, boxes = random_case(n=8, h=1000, w=1200)
    out = paste_masks(masks, boxes, (1000, 1200))  # 38 MB: the lazy path
    crops, regions = paste_masks_crops(masks, boxes, (1000, 1200))
    inside = torch.zeros_like(out, dtype=torch.bool)
    for n, (x0, y0, x1, y1) in enumerate(regions.tolist()):
        inside[n, y0:y1, x0:x1] = True
        assert torch.equal(out[n, y0:y1, x0:x1], crops[n])
    assert (out[~inside] == 0).all()


def test_edge_arguments(seed):
    masks = torch.rand(3, 1, 1)
    # Finite corners near the float range expand (padding 1 triples a 1x1 mask) to inf - inf: nothing.
    boxes = torch.tensor([[-3.4e38, 0.0, -1e38, 5.0], [3.0e38, 1.0, 3.4e38, 2.0], [1.0, 1.0, 5.0, 5.0]])
    out = paste_masks(masks, boxes, (10, 10))
    assert (out[:2] == 0).all() and (out[2] != 0).any()
    crops, regions = paste_masks_crops(masks, boxes, (10, 10))
    assert regions[:2].eq(0).all() and crops[0].numel() == 0
    with pytest.raises(RuntimeError, match="padding must be in"):
        paste_masks(masks, boxes, (10, 10), padding=1 << 20)
    # A tiny positive threshold rounds to 0 in float32: every pixel passes, in and outside regions.
    assert paste_masks(masks, boxes, (10, 10), threshold=1e-50).all()
    # Beyond the float range: nothing passes.
    assert not paste_masks(masks, boxes, (10, 10), threshold=1e300).any()


def test_lazy_and_eager_zeros_give_the_same_canvas(seed, tmp_path):
    import subprocess
    import sys
    masks, boxes = random_case(n=8, h=1000, w=1200)
    torch.save((masks, boxes), tmp_path / "in.pt")
    code = ("import sys, torch, instseg_ops; m, b = torch.load(sys.argv[1]); "
            "torch.save(instseg_ops.paste_masks(m, b, (1000, 1200)), sys.argv[2])")
    for name, env in (("lazy", {"INSTSEG_LAZY_ZEROS": "1", "INSTSEG_HUGEPAGES": "1"}), ("eager", {"INSTSEG_LAZY_ZEROS": "0"})):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.pt"), str(tmp_path / f"{name}.pt")],
                       check=True, env={**__import__("os").environ, **env})
    assert torch.equal(torch.load(tmp_path / "lazy.pt"), torch.load(tmp_path / "eager.pt"))
