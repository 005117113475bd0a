"""Hypothesis properties of mask pasting and its crop form (CPU, and CUDA when available)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cuda_available
from instseg_ops import crops_to_canvas, paste_masks, paste_masks_crops

DEVICES = ["cpu"] + (["cuda"] if cuda_available() else [])
SETTINGS = settings(max_examples=40, deadline=None)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@st.composite
def cases(draw):
    """Masks, boxes (some partly or wholly outside, tiny, huge or non-finite) and an image size."""
    n = draw(st.integers(0, 6))
    m = draw(st.integers(1, 12))
    h, w = draw(st.integers(0, 40)), draw(st.integers(0, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    masks = torch.rand(n, m, m, generator=g)
    xy = torch.rand(n, 2, generator=g) * 80 - 20
    wh = torch.rand(n, 2, generator=g) * draw(st.sampled_from([0.5, 5.0, 60.0, 1e6]))
    boxes = torch.cat([xy, xy + wh], dim=1)
    if n and draw(st.booleans()):
        boxes[draw(st.integers(0, n - 1)), draw(st.integers(0, 3))] = draw(
            st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return masks, boxes, (h, w)


@SETTINGS
@given(case=cases(), padding=st.integers(0, 2), aligned=st.booleans(), threshold=st.sampled_from([None, 0.0, 0.5]),
       dtype=st.sampled_from(DTYPES), device=st.sampled_from(DEVICES))
def test_crops_are_the_canvas_inside_their_regions_and_zero_outside(case, padding, aligned, threshold, dtype, device):
    masks, boxes, size = case
    masks, boxes = masks.to(device, dtype), boxes.to(device)
    canvas = paste_masks(masks, boxes, size, padding, threshold, aligned)
    crops, regions = paste_masks_crops(masks, boxes, size, padding, threshold, aligned)
    assert regions.dtype == torch.long and regions.shape == (masks.shape[0], 4)
    outside = torch.ones_like(canvas, dtype=torch.bool)
    for n, (x0, y0, x1, y1) in enumerate(regions.tolist()):
        assert 0 <= x0 <= x1 <= size[1] and 0 <= y0 <= y1 <= size[0]
        assert crops[n].dtype == canvas.dtype and crops[n].shape == (y1 - y0, x1 - x0)
        assert torch.equal(crops[n], canvas[n, y0:y1, x0:x1])
        outside[n, y0:y1, x0:x1] = False
    background = torch.tensor(threshold is not None and threshold <= 0.0) if threshold is not None else 0
    assert (canvas[outside] == background).all()
    if masks.shape[0]:
        fill = bool(background) if threshold is not None else 0
        assert torch.equal(crops_to_canvas(crops, regions, size, fill=fill).to(canvas.dtype), canvas)


@SETTINGS
@given(case=cases(), aligned=st.booleans(), t=st.floats(0.05, 0.95), device=st.sampled_from(DEVICES))
def test_threshold_is_probability_greater_or_equal(case, aligned, t, device):
    masks, boxes, size = case
    masks, boxes = masks.to(device), boxes.to(device)
    prob = paste_masks(masks, boxes, size, aligned=aligned)
    assert torch.equal(paste_masks(masks, boxes, size, threshold=t, aligned=aligned), prob >= t)


@SETTINGS
@given(n=st.integers(1, 4), m=st.integers(1, 10), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))
def test_ones_mask_pastes_exactly_its_clipped_integer_box(n, m, seed, device):
    g = torch.Generator().manual_seed(seed)
    h, w = 30, 40
    x0y0 = torch.randint(-10, 45, (n, 2), generator=g).float()
    wh = torch.randint(0, 30, (n, 2), generator=g).float()
    boxes = torch.cat([x0y0, x0y0 + wh], dim=1)
    out = paste_masks(torch.ones(n, m, m, device=device), boxes.to(device), (h, w), padding=0).cpu()
    for i, (bx0, by0, bx1, by1) in enumerate(boxes.long().tolist()):
        ref = torch.zeros(h, w)
        # torchvision's box covers pixels b0..b2 inclusive, clipped (no negative slice ends).
        ref[max(by0, 0):max(min(by1 + 1, h), 0), max(bx0, 0):max(min(bx1 + 1, w), 0)] = 1
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-6)


@SETTINGS
@given(m=st.sampled_from([1, 2, 4, 8]), padding=st.integers(0, 2), aligned=st.booleans(),
       seed=st.integers(0, 2**31 - 1), dy=st.integers(-8, 8), dx=st.integers(-8, 8), device=st.sampled_from(DEVICES))
def test_translating_the_box_by_whole_pixels_translates_the_output(m, padding, aligned, seed, dy, dx, device):
    # M a power of two keeps the expansion ratio (M + 2 * padding) / M exact in binary, so the
    # expanded corners are exact and truncate the same way before and after the shift.
    g = torch.Generator().manual_seed(seed)
    masks = torch.rand(3, m, m, generator=g, dtype=torch.float64).to(device)
    # Half-integer boxes whose expansion (up to 5x) stays inside the 120 x 140 image after the shift.
    x0 = torch.randint(50, 70, (3,), generator=g).double() + 0.5
    y0 = torch.randint(40, 60, (3,), generator=g).double() + 0.5
    bw = torch.randint(1, 10, (3,), generator=g).double()
    bh = torch.randint(1, 10, (3,), generator=g).double()
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], dim=1).to(device)
    out = paste_masks(masks, boxes, (120, 140), padding, aligned=aligned)
    moved = paste_masks(masks, boxes + torch.tensor([dx, dy, dx, dy], device=device, dtype=boxes.dtype), (120, 140),
                        padding, aligned=aligned)
    torch.testing.assert_close(moved.roll((-dy, -dx), dims=(1, 2)), out, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(m=st.integers(1, 10), aligned=st.booleans(), seed=st.integers(0, 2**31 - 1), device=st.sampled_from(DEVICES))
def test_flipping_mask_and_box_horizontally_flips_the_output(m, aligned, seed, device):
    g = torch.Generator().manual_seed(seed)
    h, w = 30, 40
    masks = torch.rand(3, m, m, generator=g, dtype=torch.float64).to(device)
    x0 = torch.randint(-5, 38, (3,), generator=g).double()
    y0 = torch.randint(-5, 28, (3,), generator=g).double()
    x1 = x0 + torch.randint(0, 20, (3,), generator=g).double()
    y1 = y0 + torch.randint(0, 20, (3,), generator=g).double()
    boxes = torch.stack([x0, y0, x1, y1], dim=1).to(device)
    out = paste_masks(masks, boxes, (h, w), padding=0, aligned=aligned)
    if aligned:  # x -> w - x maps the sub-pixel box [x0, x1] to [w - x1, w - x0]
        flipped_boxes = torch.stack([w - boxes[:, 2], boxes[:, 1], w - boxes[:, 0], boxes[:, 3]], dim=1)
    else:  # the integer box covers pixels x0..x1; column x -> w - 1 - x
        flipped_boxes = torch.stack([w - 1 - boxes[:, 2], boxes[:, 1], w - 1 - boxes[:, 0], boxes[:, 3]], dim=1)
    flipped = paste_masks(masks.flip(-1), flipped_boxes, (h, w), padding=0, aligned=aligned)
    # Mirrored sample positions round differently (ulps of values up to ~10): not bit-exact.
    torch.testing.assert_close(flipped, out.flip(-1), rtol=1e-5, atol=1e-5)


def test_crops_memory_is_the_sum_of_the_regions(seed):
    masks = torch.rand(50, 28, 28)
    xy = torch.rand(50, 2) * 3000
    boxes = torch.cat([xy, xy + torch.rand(50, 2) * 200 + 1], dim=1)
    crops, regions = paste_masks_crops(masks, boxes, (3000, 4000), threshold=0.5)
    areas = ((regions[:, 2] - regions[:, 0]) * (regions[:, 3] - regions[:, 1])).sum().item()
    storage = crops[0].untyped_storage()
    assert all(c.untyped_storage().data_ptr() == storage.data_ptr() for c in crops)
    assert storage.nbytes() == areas < 50 * 300 * 300  # not N x H x W (600 MB)


def test_crops_opcheck_and_compile(seed):
    from torch.library import opcheck
    masks = torch.rand(4, 14, 14)
    boxes = torch.tensor([[1.0, 2.0, 20.0, 30.0], [-5.0, -5.0, 10.0, 10.0], [40.0, 40.0, 90.0, 99.0],
                          [0.0, 0.0, 0.0, 0.0]])
    for args in ((masks, boxes, 50, 60, 1, None, False), (masks, boxes, 50, 60, 0, 0.5, True)):
        opcheck(torch.ops.instseg.paste_masks_crops.default, args,
                test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    torch._dynamo.reset()

    def f(m, b):
        data, regions, offsets = torch.ops.instseg.paste_masks_crops(m, b, 50, 60, 1, 0.5, False)
        return data.sum(), regions, offsets

    got, want = torch.compile(f, fullgraph=True, backend="aot_eager")(masks, boxes), f(masks, boxes)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


@SETTINGS
@given(case=cases(), padding=st.integers(0, 2), aligned=st.booleans(), device=st.sampled_from(DEVICES))
def test_gradient_is_the_adjoint_of_the_paste(case, padding, aligned, device):
    """Pasting is linear in the masks, so <paste(m), G> = <m, grad(G)> for any G; the crop form
    has the same gradient. Also for odd sizes, huge, tiny and non-finite boxes."""
    masks, boxes, size = case
    masks, boxes = masks.to(device, torch.float64), boxes.to(device)
    g = torch.randn((masks.shape[0],) + tuple(size), dtype=torch.float64, device=device)
    m = masks.clone().requires_grad_()
    out = paste_masks(m, boxes, size, padding, None, aligned)
    (out * g).sum().backward()
    torch.testing.assert_close((out * g).sum(), (masks * m.grad).sum(), rtol=1e-5, atol=1e-5)
    mc = masks.clone().requires_grad_()
    crops, regions = paste_masks_crops(mc, boxes, size, padding, None, aligned)
    total = sum(((c * g[n, r[1]:r[3], r[0]:r[2]]).sum() for n, (c, r) in enumerate(zip(crops, regions.tolist()))),
                torch.zeros((), dtype=torch.float64, device=device))
    if total.requires_grad:
        total.backward()
        assert torch.equal(mc.grad, m.grad)
