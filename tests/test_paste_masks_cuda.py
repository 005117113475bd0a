"""Mask pasting on CUDA: the same bits as the CPU kernel, streams, devices, graphs, compile."""
import pytest
import torch

from conftest import requires_cuda
from instseg_ops import paste_masks, paste_masks_crops
from test_paste_masks import random_case

pytestmark = [pytest.mark.cuda, requires_cuda]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.fixture
def poisoned():
    """Uninitialised memory (the crop buffers) filled with NaN/max values: unwritten elements show."""
    old = torch.are_deterministic_algorithms_enabled(), torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.use_deterministic_algorithms(old[0])
    torch.utils.deterministic.fill_uninitialized_memory = old[1]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("threshold", [None, 0.0, 0.5])
@pytest.mark.parametrize("tiny", [False, True])
def test_cuda_matches_cpu_bitwise(seed, dtype, aligned, threshold, tiny, poisoned):
    masks, boxes = random_case(n=40, m=28, tiny=tiny)
    masks = masks.to(dtype)
    boxes[3] = torch.tensor([-1e7, -1e7, 1e7, 1e7])  # huge box
    boxes[5, 1] = float("nan")
    boxes[6] = torch.tensor([-3.4e38, 0.0, -1e38, 5.0])  # expands to inf - inf
    for padding in (0, 1, 3):
        want = paste_masks(masks, boxes, (120, 160), padding, threshold, aligned)
        got = paste_masks(masks.cuda(), boxes.cuda(), (120, 160), padding, threshold, aligned)
        assert got.device.type == "cuda" and got.dtype == want.dtype
        assert torch.equal(got.cpu(), want)
        crops, regions = paste_masks_crops(masks.cuda(), boxes.cuda(), (120, 160), padding, threshold, aligned)
        want_crops, want_regions = paste_masks_crops(masks, boxes, (120, 160), padding, threshold, aligned)
        assert torch.equal(regions.cpu(), want_regions)
        for a, b in zip(crops, want_crops):
            assert torch.equal(a.cpu(), b)


def test_empty_and_bad_inputs_cuda():
    empty = paste_masks(torch.zeros(0, 28, 28, device="cuda"), torch.zeros(0, 4, device="cuda"), (10, 20))
    assert empty.shape == (0, 10, 20) and empty.is_cuda
    crops, regions = paste_masks_crops(torch.zeros(0, 28, 28, device="cuda"), torch.zeros(0, 4, device="cuda"),
                                       (10, 20))
    assert crops == [] and regions.shape == (0, 4)
    assert paste_masks(torch.rand(3, 5, 5, device="cuda"), torch.rand(3, 4, device="cuda"), (0, 7)).shape == (3, 0, 7)
    with pytest.raises(RuntimeError, match="but boxes are on"):
        paste_masks(torch.rand(2, 5, 5, device="cuda"), torch.rand(2, 4), (10, 10))


def test_runs_on_current_stream(seed):
    masks, boxes = random_case()
    ref = paste_masks(masks.cuda(), boxes.cuda(), (120, 160))
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = paste_masks(masks.cuda(), boxes.cuda(), (120, 160))
    s.synchronize()
    assert torch.equal(out, ref)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_the_inputs_device(seed):
    masks, boxes = random_case()
    with torch.cuda.device(0):
        out = paste_masks(masks.to("cuda:1"), boxes.to("cuda:1"), (120, 160), threshold=0.5)
    assert out.device == torch.device("cuda:1")
    assert torch.equal(out.cpu(), paste_masks(masks, boxes, (120, 160), threshold=0.5))


def test_cuda_graph_capture_of_the_canvas_form(seed):
    masks, boxes = random_case()
    ms, bs = masks.cuda(), boxes.cuda()
    ref = paste_masks(ms, bs, (120, 160))
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        paste_masks(ms, bs, (120, 160))
        with torch.cuda.graph(graph):
            out = paste_masks(ms, bs, (120, 160))
    torch.cuda.current_stream().wait_stream(s)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, ref)


def test_torch_compile_cuda(seed):
    torch._dynamo.reset()
    masks, boxes = random_case()

    def f(m, b):
        return paste_masks(m, b, (120, 160), threshold=0.5).sum()

    assert torch.compile(f, fullgraph=True)(masks.cuda(), boxes.cuda()).item() == f(masks, boxes).item()


def test_large_canvas_int64_indexing():
    # N x H x W > 2^31 elements (bool: 2.4 GB): positions past 2^31 must be written.
    n, h, w = 3, 30000, 30000
    masks = torch.ones(n, 4, 4, device="cuda")
    boxes = torch.tensor([[29990.0, 29990.0, 29995.0, 29995.0]] * n, device="cuda")
    out = paste_masks(masks, boxes, (h, w), padding=0, threshold=0.5)
    assert out[2, 29990:29996, 29990:29996].all() and out[2].sum().item() == 36


@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_gradients_match_cpu(seed, aligned):
    masks, boxes = random_case(n=30, m=28)
    g = torch.randn(30, 120, 160)
    cpu = masks.clone().requires_grad_()
    (paste_masks(cpu, boxes, (120, 160), 1, aligned=aligned) * g).sum().backward()
    gpu = masks.cuda().requires_grad_()
    (paste_masks(gpu, boxes.cuda(), (120, 160), 1, aligned=aligned) * g.cuda()).sum().backward()
    assert gpu.grad.device.type == "cuda"
    torch.testing.assert_close(gpu.grad.cpu(), cpu.grad, rtol=1e-5, atol=1e-5)
    crops_in = masks.cuda().requires_grad_()
    crops, regions = paste_masks_crops(crops_in, boxes.cuda(), (120, 160), 1, aligned=aligned)
    sum((c * g.cuda()[n, r[1]:r[3], r[0]:r[2]]).sum() for n, (c, r) in enumerate(zip(crops, regions.tolist()))).backward()
    torch.testing.assert_close(crops_in.grad.cpu(), cpu.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("aligned", [False, True])
def test_cuda_backward_ops_match_cpu_bitwise(seed, dtype, aligned, poisoned):
    """The backward kernels add the same terms in the same order on both devices."""
    masks, boxes = random_case(n=30, m=28)
    boxes[3] = torch.tensor([-1e7, -1e7, 1e7, 1e7])
    masks = masks.to(dtype)
    g = torch.randn(30, 120, 160, dtype=torch.float64).to(dtype)
    want = torch.ops.instseg._paste_masks_backward(g, masks, boxes, 120, 160, 1, aligned)
    got = torch.ops.instseg._paste_masks_backward(g.cuda(), masks.cuda(), boxes.cuda(), 120, 160, 1, aligned)
    assert torch.equal(got.cpu(), want)
    data, regions, offsets = torch.ops.instseg.paste_masks_crops(masks, boxes, 120, 160, 1, None, aligned)
    gd = torch.randn(data.shape, dtype=torch.float64).to(dtype)
    want = torch.ops.instseg._paste_masks_crops_backward(gd, masks, boxes, regions, offsets, 120, 160, 1, aligned)
    got = torch.ops.instseg._paste_masks_crops_backward(gd.cuda(), masks.cuda(), boxes.cuda(), regions.cuda(),
                                                         offsets.cuda(), 120, 160, 1, aligned)
    assert torch.equal(got.cpu(), want)
