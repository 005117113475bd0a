"""Hypothesis properties of RoIAlign (CPU, and CUDA when available)."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import cuda_available
from instseg_ops import roi_align

DEVICES = ["cpu"] + (["cuda"] if cuda_available() else [])
SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def problems(draw, dtype=torch.float64, inside=False):
    """A feature map, RoIs and RoIAlign arguments drawn together."""
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    h = draw(st.integers(5 if inside else 1, 12))
    w = draw(st.integers(5 if inside else 1, 12))
    k = draw(st.integers(1, 8))
    ph = draw(st.integers(1, 4))
    pw = draw(st.integers(1, 4))
    sr = draw(st.sampled_from([-1, 0, 1, 2, 3]))
    aligned = draw(st.booleans())
    layout = draw(st.sampled_from(["nchw", "channels_last"]))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if inside:
        # Boxes at least one pixel wide and tall, inside [1, size - 2]: all
        # their samples fall on the map, whatever `aligned` is.
        x1 = 1 + torch.rand(k, generator=g, dtype=torch.float64) * (w - 3) / 2
        y1 = 1 + torch.rand(k, generator=g, dtype=torch.float64) * (h - 3) / 2
        x2 = x1 + 1 + torch.rand(k, generator=g, dtype=torch.float64) * (w - 3 - x1)
        y2 = y1 + 1 + torch.rand(k, generator=g, dtype=torch.float64) * (h - 3 - y1)
    else:
        x1 = torch.rand(k, generator=g, dtype=torch.float64) * (w + 4) - 2
        y1 = torch.rand(k, generator=g, dtype=torch.float64) * (h + 4) - 2
        x2 = x1 + torch.rand(k, generator=g, dtype=torch.float64) * w - 1
        y2 = y1 + torch.rand(k, generator=g, dtype=torch.float64) * h - 1
    b = torch.randint(0, n, (k,), generator=g).double()
    rois = torch.stack([b, x1, y1, x2, y2], dim=1).to(dtype)
    return x, rois, (ph, pw), sr, aligned


def run(x, rois, size, sr, aligned, device, **kw):
    return roi_align(x.to(device), rois.to(device), size, 1.0, sr, aligned, **kw)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems(), data=st.data())
def test_permuting_rois_permutes_outputs(device, p, data):
    x, rois, size, sr, aligned = p
    perm = torch.tensor(data.draw(st.permutations(range(rois.shape[0]))))
    a = run(x, rois, size, sr, aligned, device)
    b = run(x, rois[perm], size, sr, aligned, device)
    assert torch.equal(a[perm], b)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems(), alpha=st.floats(-3, 3), beta=st.floats(-3, 3))
def test_linear_in_the_input(device, p, alpha, beta):
    x, rois, size, sr, aligned = p
    y = torch.randn_like(x)
    lhs = run(alpha * x + beta * y, rois, size, sr, aligned, device)
    rhs = alpha * run(x, rois, size, sr, aligned, device) + beta * run(y, rois, size, sr, aligned, device)
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
@SETTINGS
@given(p=problems())
def test_adjoint_identity(device, deterministic, p):
    """<roi_align(x), g> == <x, roi_align_backward(g)>."""
    x, rois, size, sr, aligned = p
    n, c, h, w = x.shape
    g = torch.randn(rois.shape[0], c, *size, dtype=x.dtype)
    out = run(x, rois, size, sr, aligned, device)
    cl = not x.is_contiguous()
    back = torch.ops.instseg._roi_align_backward(g.to(device), rois.to(device), 1.0, size[0], size[1], n, c, h, w,
                                                 sr, aligned, cl, deterministic)
    lhs = (out.cpu() * g).sum()
    rhs = (x * back.cpu()).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems(inside=True), value=st.floats(-100, 100))
def test_constant_map_gives_the_constant(device, p, value):
    x, rois, size, sr, aligned = p
    out = run(torch.full_like(x, value), rois, size, sr, aligned, device)
    torch.testing.assert_close(out.cpu(), torch.full_like(out.cpu(), value), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems(inside=True), dy=st.integers(0, 5), dx=st.integers(0, 5), pad=st.integers(0, 3))
def test_translating_features_and_boxes_changes_nothing(device, p, dy, dx, pad):
    x, rois, size, sr, aligned = p
    moved = F.pad(x, (dx, pad, dy, pad))  # shift right by dx, down by dy
    if not x.is_contiguous():
        moved = moved.contiguous(memory_format=torch.channels_last)
    shifted = rois.clone()
    shifted[:, [1, 3]] += dx
    shifted[:, [2, 4]] += dy
    a = run(x, rois, size, sr, aligned, device)
    b = run(moved, shifted, size, sr, aligned, device)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems(dtype=torch.float32))
def test_deterministic_mode_is_bitwise_repeatable(device, p):
    x, rois, size, sr, aligned = p
    outs, grads = [], []
    for _ in range(3):
        xi = x.to(device).requires_grad_()
        out = roi_align(xi, rois.to(device), size, 1.0, sr, aligned, deterministic=True)
        out.backward(torch.ones_like(out))
        outs.append(out.detach())
        grads.append(xi.grad)
    for o, gr in zip(outs[1:], grads[1:]):
        assert torch.equal(o, outs[0])
        assert torch.equal(gr, grads[0])
