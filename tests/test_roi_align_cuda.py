"""RoIAlign on CUDA: agreement with the CPU kernels and the reference, the
deterministic backward, device guard, streams, bad input. Skipped without a GPU."""
import pytest
import torch

from conftest import requires_cuda
from instseg_ops import roi_align
from instseg_ops.reference import roi_align_reference
from roi_utils import as_layout, random_rois

pytestmark = [pytest.mark.cuda, requires_cuda]

LAYOUTS = ["nchw", "channels_last"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def problem(dtype, layout, n=2, c=5, h=23, w=29, k=40, scale=0.5, malformed=True):
    x = as_layout(torch.randn(n, c, h, w, dtype=torch.float64).to(dtype), layout)
    rois = random_rois(k, n, h, w, scale=scale, dtype=torch.float32 if dtype != torch.float64 else dtype,
                       malformed=malformed)
    return x, rois


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_cpu_forward_and_backward(seed, dtype, layout, aligned, deterministic):
    x, rois = problem(dtype, layout)
    xc = x.clone().requires_grad_()
    xg = x.cuda().requires_grad_()
    out_c = roi_align(xc, rois, (5, 4), 0.5, -1, aligned)
    out_g = roi_align(xg, rois.cuda(), (5, 4), 0.5, -1, aligned, deterministic=deterministic)
    assert out_g.dtype == dtype and out_g.is_contiguous(memory_format=out_c.suggest_memory_format())
    tol = TOL[dtype]
    torch.testing.assert_close(out_g.cpu().double(), out_c.double(), rtol=tol, atol=tol)
    g = torch.randn(out_c.shape, dtype=torch.float64).to(dtype)
    out_c.backward(g)
    out_g.backward(g.cuda())
    assert xg.grad.dtype == dtype
    if layout == "channels_last":
        assert xg.grad.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xg.grad.cpu().double(), xc.grad.double(), rtol=4 * tol, atol=4 * tol)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_matches_reference_float64(seed, layout):
    x, rois = problem(torch.float64, layout)
    for sr in (-1, 0, 2):
        out = roi_align(x.cuda(), rois.cuda(), 3, 0.5, sr, True)
        torch.testing.assert_close(out.cpu(), roi_align_reference(x, rois, (3, 3), 0.5, sr, True),
                                   rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deterministic_backward_bitwise_repeatable(seed, layout):
    x, rois = problem(torch.float32, layout, c=16, h=64, w=80, k=300, malformed=False)
    g = torch.randn(300, 16, 7, 7, device="cuda")
    grads = []
    for _ in range(5):
        xg = x.cuda().requires_grad_()
        roi_align(xg, rois.cuda(), 7, 0.5, 2, deterministic=True).backward(g)
        grads.append(xg.grad)
    for gr in grads[1:]:
        assert torch.equal(gr, grads[0])
    # The global switch selects it too.
    torch.use_deterministic_algorithms(True)
    try:
        xg = x.cuda().requires_grad_()
        roi_align(xg, rois.cuda(), 7, 0.5, 2).backward(g)
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(xg.grad, grads[0])


def test_nondeterministic_backward_alerts_in_deterministic_mode(seed):
    x, rois = problem(torch.float32, "nchw")
    xg = x.cuda().requires_grad_()
    out = roi_align(xg, rois.cuda(), 3, 0.5, 2, deterministic=False)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)


def test_nonfinite_boxes_and_empty_inputs_cuda(seed):
    x, rois = problem(torch.float32, "nchw", k=6, malformed=False)
    rois[0, 1] = float("nan")
    rois[1, 1:] = torch.tensor([-float("inf"), 0, float("inf"), 3.0])
    rois[2, 1:] = torch.tensor([-1e30, -1e30, 1e30, 1e30])
    xg = x.cuda().requires_grad_()
    out = roi_align(xg, rois.cuda(), 3, 0.5, -1)
    assert torch.isfinite(out).all() and (out[:2] == 0).all()
    out.sum().backward()
    assert torch.isfinite(xg.grad).all()
    assert roi_align(xg, torch.zeros(0, 5, device="cuda"), 3).shape == (0, 5, 3, 3)
    assert roi_align(torch.zeros(2, 0, 4, 4, device="cuda"), rois.cuda(), 3).shape == (6, 0, 3, 3)


def test_bad_inputs_cuda():
    x = torch.randn(2, 3, 8, 8, device="cuda")
    rois = random_rois(4, 2, 8, 8, device="cuda")
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.instseg.roi_align(x, rois.cpu(), 1.0, 2, 2, 2, False, False)
    for bad in (2.0, -1.0, float("nan")):
        r = rois.clone()
        r[0, 0] = bad
        with pytest.raises(RuntimeError, match="batch ind"):
            roi_align(x, r, 2)


def test_runs_on_current_stream(seed):
    x, rois = problem(torch.float32, "nchw")
    ref = roi_align(x.cuda(), rois.cuda(), 4, 0.5, 2)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xs, rs = x.cuda(), rois.cuda()
        out = roi_align(xs, rs, 4, 0.5, 2)
    s.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device(seed):
    x, rois = problem(torch.float32, "nchw")
    with torch.cuda.device(0):
        out = roi_align(x.to("cuda:1"), rois.to("cuda:1"), 4, 0.5, 2)
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu(), roi_align(x, rois, 4, 0.5, 2))


def test_cuda_graph_capture(seed):
    x, rois = problem(torch.float32, "nchw", malformed=False)
    xs, rs = x.cuda(), rois.cuda()
    ref = roi_align(xs, rs, 4, 0.5, 2)
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        roi_align(xs, rs, 4, 0.5, 2)
        with torch.cuda.graph(graph):
            out = roi_align(xs, rs, 4, 0.5, 2)
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_torch_compile_cuda(seed):
    torch._dynamo.reset()
    x, rois = problem(torch.float32, "nchw")
    xs = x.cuda().requires_grad_()

    def f(inp, r):
        return roi_align(inp, r, 3, 0.5, 2).square().sum()

    loss = torch.compile(f, fullgraph=True)(xs, rois.cuda())
    loss.backward()
    xr = x.cuda().requires_grad_()
    f(xr, rois.cuda()).backward()
    torch.testing.assert_close(xs.grad, xr.grad)
