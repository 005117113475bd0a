"""RoIAlign on the CPU: semantics, gradients, registration, layouts, robustness.

Every comparison draws fresh random inputs (see the `seed` fixture) and checks
every element.
"""
import pytest
import torch
from torch.library import opcheck

from instseg_ops import RoIAlign, roi_align
from instseg_ops.reference import roi_align_reference
from roi_utils import as_layout, random_rois

try:
    import torchvision
    from torchvision.ops import roi_align as tv_roi_align
except ImportError:  # torchvision is an optional peer
    torchvision = None

needs_torchvision = pytest.mark.skipif(torchvision is None, reason="torchvision not installed")

LAYOUTS = ["nchw", "channels_last"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 6e-2}


def make_input(n=2, c=3, h=11, w=13, dtype=torch.float32, layout="nchw"):
    return as_layout(torch.randn(n, c, h, w, dtype=torch.float64).to(dtype), layout)


# ---------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 0, 1, 3])
def test_matches_reference(seed, dtype, layout, aligned, sampling_ratio):
    x = make_input(dtype=dtype, layout=layout)
    scale = 0.5
    rois = random_rois(25, 2, 11, 13, scale=scale, dtype=dtype, malformed=True)
    out = roi_align(x, rois, (4, 3), scale, sampling_ratio, aligned)
    ref = roi_align_reference(x, rois, (4, 3), scale, sampling_ratio, aligned)
    assert out.shape == (25, 3, 4, 3) and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_half_types_accumulate_in_float(seed, dtype, layout):
    x = make_input(c=5, h=20, w=24, dtype=dtype, layout=layout)
    rois = random_rois(30, 2, 20, 24, dtype=torch.float32)
    out = roi_align(x, rois, 7, 1.0, -1, False)
    assert out.dtype == dtype
    # Reference on the same (rounded) values with the same float32 geometry,
    # accumulated in float64: the only error left is the final rounding to the
    # half type, if the kernel accumulates in float.
    ref = roi_align_reference(x.float(), rois, (7, 7), 1.0, -1, False).double()
    eps = torch.finfo(dtype).eps
    assert ((out.double() - ref).abs() <= eps * ref.abs() + 1e-6).all()
    # Gradient in the same dtype and layout, close to the float64 gradient.
    xg = x.detach().clone().requires_grad_()
    g = torch.randn(out.shape, dtype=torch.float64)
    roi_align(xg, rois, 7, 1.0, -1, False).backward(g.to(dtype))
    x64 = x.detach().double().requires_grad_()
    roi_align(x64, rois, 7, 1.0, -1, False).backward(g.to(dtype).double())
    assert xg.grad.dtype == dtype
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=4 * eps, atol=1e-3)


def test_box_dtype_may_differ_from_input(seed):
    x = make_input(dtype=torch.float16)
    rois = random_rois(10, 2, 11, 13, dtype=torch.float64)
    torch.testing.assert_close(roi_align(x, rois, 2), roi_align(x, rois.float(), 2), rtol=0, atol=0)


@needs_torchvision
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("output_size", [(7, 7), (5, 3)])
def test_matches_torchvision(seed, dtype, aligned, sampling_ratio, output_size):
    x = make_input(n=3, c=4, h=24, w=31, dtype=dtype)
    scale = 0.25
    rois = random_rois(40, 3, 24, 31, scale=scale, dtype=dtype)  # well-formed boxes
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    out = roi_align(xa, rois, output_size, scale, sampling_ratio, aligned)
    ref = tv_roi_align(xb, rois, output_size, scale, sampling_ratio, aligned)
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype])
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=TOL[dtype], atol=TOL[dtype])


@needs_torchvision
def test_list_boxes_and_module_match_torchvision(seed):
    x = make_input(n=2, c=3, h=16, w=16)
    boxes = [random_rois(7, 1, 16, 16)[:, 1:], random_rois(0, 1, 16, 16)[:, 1:], random_rois(5, 1, 16, 16)[:, 1:]]
    x = make_input(n=3, c=3, h=16, w=16)
    ours = RoIAlign((3, 3), 1.0, 2, aligned=True)(x, boxes)
    ref = torchvision.ops.RoIAlign((3, 3), 1.0, 2, aligned=True)(x, boxes)
    torch.testing.assert_close(ours, ref)
    assert "output_size=(3, 3)" in repr(RoIAlign((3, 3), 1.0, 2))


# ---------------------------------------------------------------------------
# Gradients and registration


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
def test_backward_matches_reference_autograd(seed, layout, aligned):
    x = make_input(dtype=torch.float64, layout=layout).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    rois = random_rois(20, 2, 11, 13, scale=0.5, dtype=torch.float64, malformed=True)
    g = torch.randn(20, 3, 3, 4, dtype=torch.float64)
    roi_align(x, rois, (3, 4), 0.5, -1, aligned).backward(g)
    roi_align_reference(xr, rois, (3, 4), 0.5, -1, aligned).backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    if layout == "channels_last":
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_and_gradgradcheck(seed, aligned, layout):
    x = make_input(n=2, c=2, h=6, w=7, dtype=torch.float64, layout=layout).requires_grad_()
    rois = random_rois(6, 2, 6, 7, dtype=torch.float64)

    def f(inp):
        return roi_align(inp, rois, (2, 3), 1.0, 2, aligned)

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def _opcheck_samples():
    torch.manual_seed(0)
    samples = []
    for dtype in (torch.float32, torch.float64):
        for layout in LAYOUTS:
            x = make_input(dtype=dtype, layout=layout)
            rois = random_rois(5, 2, 11, 13, dtype=dtype)
            samples.append((x, rois))
    return samples


@pytest.mark.parametrize("idx", range(4))
def test_opcheck(idx):
    x, rois = _opcheck_samples()[idx]
    opcheck(torch.ops.instseg.roi_align.default, (x.requires_grad_(), rois, 0.5, 3, 2, -1, False, False))
    grad = torch.randn(rois.shape[0], x.shape[1], 3, 2, dtype=x.dtype)
    opcheck(torch.ops.instseg._roi_align_backward.default,
            (grad, rois, 0.5, 3, 2, 2, 3, 11, 13, -1, False, not x.is_contiguous(), False))


def test_torch_compile_fullgraph_forward_backward(seed):
    torch._dynamo.reset()

    def f(inp, rois):
        return roi_align(inp, rois, (3, 3), 0.5, 2, True).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = make_input(dtype=torch.float64).requires_grad_()
    rois = random_rois(9, 2, 11, 13, scale=0.5, dtype=torch.float64)
    loss = compiled(x, rois)
    (g,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_()
    loss2 = f(x2, rois)
    (g2,) = torch.autograd.grad(loss2, x2)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(g, g2)


def test_torch_export(seed):
    class M(torch.nn.Module):
        def forward(self, inp, rois):
            return roi_align(inp, rois, 2, 1.0, 2)

    x = make_input()
    rois = random_rois(4, 2, 11, 13)
    ep = torch.export.export(M(), (x, rois))
    torch.testing.assert_close(ep.module()(x, rois), M()(x, rois))


def test_autocast_cpu(seed):
    conv = torch.nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(2, 3, 16, 16)
    rois = random_rois(10, 2, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        feats = conv(x)
        out = roi_align(feats, rois, 4, 1.0, 2)
    assert feats.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    ref = roi_align_reference(feats.float(), rois, (4, 4), 1.0, 2)
    torch.testing.assert_close(out.float(), ref, rtol=1e-2, atol=1e-2)
    out.float().sum().backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()


# ---------------------------------------------------------------------------
# Layout, determinism, poisoned outputs


def test_channels_last_is_read_in_place(seed):
    x = make_input(c=8, layout="channels_last").requires_grad_()
    rois = random_rois(6, 2, 11, 13)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = roi_align(x, rois, 3, 1.0, 2)
        out.backward(torch.randn_like(out))
    copies = [e.name for e in prof.events() if e.name in ("aten::copy_", "aten::clone", "aten::contiguous")]
    assert copies == []
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_layouts_agree_bitwise(seed):
    x = make_input(c=6, dtype=torch.float32)
    rois = random_rois(15, 2, 11, 13, malformed=True)
    a = roi_align(x, rois, 3, 1.0, -1)
    b = roi_align(as_layout(x, "channels_last"), rois, 3, 1.0, -1)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_result_independent_of_thread_count(seed, layout):
    x = make_input(n=2, c=16, h=40, w=50, layout=layout).requires_grad_()
    rois = random_rois(60, 2, 40, 50, malformed=True)
    g = torch.randn(60, 16, 5, 5)
    results = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            x.grad = None
            out = roi_align(x, rois, 5, 1.0, -1)
            out.backward(g)
            results.append((out.detach().clone(), x.grad.clone()))
    finally:
        torch.set_num_threads(prev)
    for out, grad in results[1:]:
        assert torch.equal(out, results[0][0])
        assert torch.equal(grad, results[0][1])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_output_element_is_written(seed, layout, dtype):
    """With fill_uninitialized_memory, torch.empty returns NaN-filled memory:
    any element a kernel forgot to write would show up as NaN."""
    import torch.utils.deterministic

    x = make_input(c=4, h=9, w=10, dtype=dtype, layout=layout).requires_grad_()
    rois = random_rois(12, 2, 9, 10, malformed=True)
    rois[3, 0] = 1.0
    rois[4, 1:] = float("nan")  # an invalid RoI writes zeros
    prev = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    try:
        torch.use_deterministic_algorithms(True)
        torch.utils.deterministic.fill_uninitialized_memory = True
        out = roi_align(x, rois, 3, 1.0, 2)
        out.backward(torch.ones_like(out))
    finally:
        torch.use_deterministic_algorithms(prev[0])
        torch.utils.deterministic.fill_uninitialized_memory = prev[1]
    assert not out.isnan().any() and not x.grad.isnan().any()
    ref = roi_align_reference(x.detach().double(), rois, (3, 3), 1.0, 2)
    torch.testing.assert_close(out.double(), ref, rtol=TOL[dtype], atol=TOL[dtype])


# ---------------------------------------------------------------------------
# Robustness


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 3, 8, 8)
    rois = random_rois(4, 2, 8, 8)
    with pytest.raises(RuntimeError, match="4-D"):
        roi_align(x[0], rois, 2)
    with pytest.raises(ValueError, match=r"Tensor\[K, 5\]"):
        roi_align(x, rois[:, :4], 2)
    with pytest.raises(RuntimeError, match=r"Tensor\[K, 5\]"):  # the op itself checks too
        torch.ops.instseg.roi_align(x, rois[:, :4], 1.0, 2, 2, 2, False, False)
    with pytest.raises(ValueError, match=r"Tensor\[L, 4\]"):
        roi_align(x, [rois[:, :3]], 2)
    with pytest.raises(RuntimeError, match="floating"):
        roi_align(x.long(), rois, 2)
    with pytest.raises(RuntimeError, match="floating"):
        roi_align(x, rois.long(), 2)
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        roi_align(x, rois, (0, 2))
    with pytest.raises(RuntimeError, match="output_size must be positive"):
        roi_align(x, rois, -1)
    for bad in (2.0, -1.0, 7.0, float("nan"), float("inf")):
        r = rois.clone()
        r[1, 0] = bad
        with pytest.raises(RuntimeError, match="not a valid batch index"):
            roi_align(x, r, 2)
    with pytest.raises(RuntimeError, match="not a valid batch index"):
        roi_align(x[:0], rois, 2)
    with pytest.raises(ValueError, match="output_size"):
        roi_align(x, rois, (1, 2, 3))
    with pytest.raises(ValueError, match="sampling_ratio must be an integer"):
        roi_align(x, rois, 2, 1.0, 2.5)
    with pytest.raises(RuntimeError, match="sampling_ratio must be <= 1024"):
        roi_align(x, rois, 2, 1.0, 1025)  # sr^2 samples per bin: a hang, not a result
    roi_align(x, rois, 2, 1.0, 1024)
    for scale in (float("inf"), float("nan"), 1e39):
        with pytest.raises(RuntimeError, match="spatial_scale must be finite"):
            roi_align(x, rois, 2, scale)
        with pytest.raises(RuntimeError, match="spatial_scale must be finite"):
            torch.ops.instseg._roi_align_backward(torch.zeros(4, 3, 2, 2), rois, scale, 2, 2, 2, 3, 8, 8, 2,
                                                  False, False, False)
    with pytest.raises(TypeError, match="boxes"):
        roi_align(x, "boxes", 2)
    if torch.backends.mps.is_available() or torch.cuda.is_available():
        return
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.instseg.roi_align(x, rois.to("meta"), 1.0, 2, 2, 2, False, False)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
def test_nonfinite_and_huge_boxes_give_zeros_or_finite_values(seed, layout, aligned):
    x = make_input(c=4, layout=layout).requires_grad_()
    rois = random_rois(10, 2, 11, 13)
    nan, inf = float("nan"), float("inf")
    rois[0, 1] = nan
    rois[1, 2] = inf
    rois[2, 3] = -inf
    rois[3, 1:] = torch.tensor([-inf, -inf, inf, inf])
    rois[4, 1:] = torch.tensor([-3e38, -3e38, 3e38, 3e38])  # overflows when scaled
    rois[5, 1:] = torch.tensor([-1e30, -1e30, 1e30, 1e30])  # finite, absurd grid
    rois[6, 1:] = torch.tensor([-1e7, 2.0, 1e7, 6.0])  # ~10^7 samples per bin, ~10 on the map
    rois[7, 1:] = torch.tensor([-2e3, 2.0, 2e3, 6.0])  # big, but the reference can still afford it
    out = roi_align(x, rois, 3, 2.0, -1, aligned)
    assert torch.isfinite(out).all()
    assert (out[:4] == 0).all()
    ref = roi_align_reference(x.detach(), rois[[7, 8, 9]], (3, 3), 2.0, -1, aligned)
    torch.testing.assert_close(out[[7, 8, 9]], ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_list_boxes_keep_large_batch_indices_exact(seed, dtype):
    """float16 (bfloat16) cannot hold integers above 2048 (256): the batch index column built
    from a list of boxes must not be rounded into another image's."""
    n = 2050 if dtype == torch.float16 else 260
    x = torch.randn(n, 1, 4, 4, dtype=dtype)
    boxes = [torch.tensor([[0.5, 0.5, 3.0, 3.5]], dtype=dtype)] * n
    out = roi_align(x, boxes, 2, 1.0, 2)
    expect = roi_align(x.float(), torch.cat([torch.arange(n, dtype=torch.float32)[:, None],
                                             boxes[0].float().expand(n, 4)], dim=1), 2, 1.0, 2)
    torch.testing.assert_close(out.float(), expect, rtol=1e-2, atol=1e-2)
    assert torch.equal(out[-1], roi_align(x[-1:], [boxes[0]], 2, 1.0, 2)[0])


def test_empty_inputs():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for rois in (torch.zeros(0, 5), [], [torch.zeros(0, 4), torch.zeros(0, 4)]):
        out = roi_align(x, rois, 2)
        assert out.shape == (0, 3, 2, 2)
        out.sum().backward()
        assert x.grad.shape == x.shape and (x.grad == 0).all()
    no_channels = torch.randn(2, 0, 8, 8, requires_grad=True)
    out = roi_align(no_channels, random_rois(3, 2, 8, 8), 2)
    assert out.shape == (3, 0, 2, 2)
    out.sum().backward()
    empty_map = torch.randn(2, 3, 0, 5)
    assert (roi_align(empty_map, random_rois(3, 2, 4, 5), 2) == 0).all()
    assert roi_align(torch.randn(0, 3, 4, 4), torch.zeros(0, 5), 2).shape == (0, 3, 2, 2)


def test_large_adaptive_grid_is_bounded():
    """A RoI a million times larger than the map samples only what lies on it."""
    x = torch.randn(1, 2, 16, 16)
    rois = torch.tensor([[0.0, -1e6, -1e6, 1e6, 1e6]])
    out = roi_align(x, rois, 2, 1.0, -1)
    assert torch.isfinite(out).all()


def test_huge_box_with_an_edge_on_the_map_keeps_all_valid_samples(seed):
    """A box from x = -3e9 to x = 97 (float32): its ~4e8 samples per bin have
    coordinates that round by hundreds of pixels, and the pruning of off-map
    samples must allow for that. The expected value evaluates, in float32 with
    numpy, every sample within 10^5 indices of where the map starts and ends
    (all others are thousands of pixels off the map)."""
    import numpy as np

    w, pw = 200, 7
    x = torch.randn(1, 1, 1, w)
    x1, x2 = np.float32(-3.0202342e9), np.float32(96.79984)
    rois = torch.tensor([[0.0, float(x1), 0.0, float(x2), 0.5]])
    out = roi_align(x, rois, (1, pw), 1.0, -1, False)
    f32 = np.float32
    bin_w = f32(x2 - x1) / f32(pw)
    grid = int(np.ceil(f32(x2 - x1) / f32(pw)))  # in float32, as the kernels do
    step = float(bin_w) / grid
    feat = x[0, 0, 0].double().numpy()
    expect = []
    for p in range(pw):
        base = float(x1) + p * float(bin_w)
        centre = [(-1 - base) / step, (w - base) / step]
        idx = np.concatenate([np.arange(int(c) - 10**5, int(c) + 10**5) for c in centre])
        idx = np.unique(idx[(idx >= 0) & (idx < grid)]).astype(np.float32)
        coord = (x1 + f32(p) * bin_w) + ((idx + f32(0.5)) * bin_w) / f32(grid)  # float32 at every step
        coord = coord[(coord >= -1) & (coord <= w)]
        c = np.maximum(coord, 0).astype(np.float64)
        lo = np.floor(c).astype(np.int64)
        edge = lo >= w - 1
        lo[edge] = w - 1
        hi = np.where(edge, lo, lo + 1)
        c[edge] = lo[edge]
        frac = c - lo
        expect.append(((1 - frac) * feat[lo] + frac * feat[hi]).sum() / float(f32(grid)))  # grid_h = 1
    torch.testing.assert_close(out[0, 0, 0].double(), torch.tensor(expect, dtype=torch.float64), rtol=1e-4, atol=1e-12)
