"""Multi-scale deformable attention: values and gradients against two independent
pure-PyTorch implementations (ours in instseg_ops.reference and transformers' own),
registration, compile/export, robustness, properties, the MSDeformAttn module, and CUDA
against the CPU (skipped without a GPU).

Every comparison draws fresh random shapes and inputs (see the `seed` fixture) and checks
every element.
"""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _helpers import cuda_available, requires_cuda
from instseg_ops import MSDeformAttn, ms_deform_attn
from instseg_ops.reference import ms_deform_attn_reference
from op_contract import OpContract, pytest_generate_tests  # noqa: F401  (parametrizes the contract)

try:
    from transformers.models.deformable_detr import modeling_deformable_detr as hf_ddetr
except ImportError:  # transformers is a test dependency; the rest runs without it
    hf_ddetr = None

needs_transformers = pytest.mark.skipif(hf_ddetr is None, reason="transformers not installed")
HALF = (torch.float16, torch.bfloat16)


def random_problem(gen, dtype=torch.float64, device="cpu", *, n=None, lq=None, outside=0.25, max_hw=9, max_md=(4, 8)):
    """value, level shapes (pairs), locations and weights with shapes drawn from `gen`.

    Locations are drawn in [-outside, 1 + outside] so that some fall off the levels."""
    def draw(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    n = draw(1, 3) if n is None else n
    m, d, n_levels, p = draw(1, max_md[0]), draw(1, max_md[1]), draw(1, 4), draw(1, 4)
    lq = draw(0, 12) if lq is None else lq
    shapes = [(draw(1, max_hw), draw(1, max_hw)) for _ in range(n_levels)]
    s = sum(h * w for h, w in shapes)
    value = torch.randn(n, s, m, d, generator=gen, dtype=torch.float64)
    loc = torch.rand(n, lq, m, n_levels, p, 2, generator=gen, dtype=torch.float64) * (1 + 2 * outside) - outside
    attn = torch.rand(n, lq, m, n_levels, p, generator=gen, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True).clamp(min=1e-6)
    if dtype in (torch.float16, torch.bfloat16):
        loc = away_from_cell_edges(loc.to(dtype).double(), shapes).to(dtype).double()
    return (value.to(device, dtype), shapes, loc.to(device, dtype), attn.to(device, dtype))


def away_from_cell_edges(loc, shapes, margin=0.05):
    """Moves the sampling points that lie within ``margin`` pixels of a cell edge of their level
    (where bilinear sampling's gradient with respect to the location jumps, and float32 and
    float64 may pick different cells) to the centre of their cell: with half-type locations a
    reference in float64 is otherwise not comparable there."""
    out = loc.clone()
    for lvl, (h, w) in enumerate(shapes):
        for c, size in ((0, w), (1, h)):
            x = out[..., lvl, :, c] * size - 0.5
            near = (x - x.round()).abs() < margin
            out[..., lvl, :, c] = torch.where(near, (x.floor() + 1.0) / size, out[..., lvl, :, c])
    return out


def tables(shapes, device="cpu"):
    t = torch.tensor(shapes, dtype=torch.int64, device=device).reshape(-1, 2)
    areas = t[:, 0] * t[:, 1]
    return t, torch.cat([areas.new_zeros(1), areas.cumsum(0)[:-1]])


def hf_function(value, shapes, loc, attn):
    """transformers' pure-PyTorch multi-scale deformable attention (grid_sample)."""
    st_, lsi = tables(shapes, value.device)
    return hf_ddetr.MultiScaleDeformableAttention()(value, st_, shapes, lsi, loc, attn, 64)


# ---------------------------------------------------------------------------
# The shared op contract: dtype x layout x device x reference x gradients x opcheck


class TestMsDeformAttnContract(OpContract):
    layouts = ("contiguous", "strided")
    differentiable = (0, 2, 3)

    def sample(self, dtype, layout, device, gen, problem=None):
        value, shapes, loc, attn = problem or random_problem(gen, dtype, device,
                                                             lq=int(torch.randint(1, 9, (1,), generator=gen)))
        if layout == "strided":  # every input a non-contiguous view (stride 2 everywhere)
            value, loc, attn = (torch.stack([t, torch.full_like(t, float("nan"))], -1)[..., 0] for t in (value, loc, attn))
        return value, shapes, loc, attn

    def gradcheck_sample(self, layout, device, gen):
        value, shapes, loc, attn = random_problem(gen, torch.float64, device, n=2, lq=3, max_hw=4, max_md=(2, 3))
        return self.sample(torch.float64, layout, device, gen, (value, shapes, loc, attn))

    def run(self, value, shapes, loc, attn, **kw):
        return ms_deform_attn(value, shapes, None, loc, attn, **kw)

    def reference(self, value, shapes, loc, attn):
        return ms_deform_attn_reference(value, shapes, loc, attn)

    def tolerance(self, dtype):
        # Half types: the inputs are the same rounded values, the only error is the
        # rounding of the result (accumulation is in float32).
        return {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]

    def op_calls(self, value, shapes, loc, attn):
        st_, lsi = tables(shapes, value.device)
        out = ms_deform_attn(value, shapes, None, loc, attn)
        grad = torch.randn_like(out)
        return [(torch.ops.instseg.ms_deform_attn.default,
                 (value.detach().requires_grad_(), st_, lsi, loc.detach().requires_grad_(),
                  attn.detach().requires_grad_(), False)),
                (torch.ops.instseg._ms_deform_attn_backward.default, (grad, value, st_, lsi, loc, attn, False))]


# ---------------------------------------------------------------------------
# Values and gradients against transformers' function, on fresh random shapes


@needs_transformers
@pytest.mark.parametrize("trial", range(4))
def test_matches_transformers_forward_and_gradients(seed, trial):
    gen = torch.Generator().manual_seed(seed + trial)
    value, shapes, loc, attn = random_problem(gen, torch.float64)
    ins = [t.requires_grad_() for t in (value, loc, attn)]
    ref_ins = [t.detach().clone().requires_grad_() for t in ins]
    out = ms_deform_attn(ins[0], shapes, None, ins[1], ins[2])
    ref = hf_function(ref_ins[0], shapes, ref_ins[1], ref_ins[2])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    if out.numel() == 0:
        return
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, ins, g), torch.autograd.grad(ref, ref_ins, g)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@needs_transformers
def test_matches_transformers_float32(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float32, n=2, lq=20, max_hw=16)
    torch.testing.assert_close(ms_deform_attn(value, shapes, None, loc, attn), hf_function(value, shapes, loc, attn),
                               rtol=1e-5, atol=1e-5)


def test_tensor_and_list_level_tables_agree(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float32, lq=5)
    st_, lsi = tables(shapes)
    a = ms_deform_attn(value, shapes, None, loc, attn)
    b = ms_deform_attn(value, st_, lsi, loc, attn)
    c = ms_deform_attn(value, st_, None, loc, attn)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("dtype", HALF)
def test_half_values_with_float32_locations_and_weights(seed, dtype):
    """Under autocast the value projection is half/bfloat16 while the softmaxed weights and the
    locations are float32: the op takes them as they are, gradients keep each input's dtype."""
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float32, lq=7)
    v = value.to(dtype).requires_grad_()
    lo, a = loc.clone().requires_grad_(), attn.clone().requires_grad_()
    out = ms_deform_attn(v, shapes, None, lo, a)
    assert out.dtype == dtype
    ref = ms_deform_attn_reference(v.detach().double(), shapes, loc.double(), attn.double())
    torch.testing.assert_close(out.double(), ref, rtol=4e-3 if dtype == torch.float16 else 3e-2, atol=1e-2)
    gv, gl, ga = torch.autograd.grad(out, (v, lo, a), torch.ones_like(out))
    assert (gv.dtype, gl.dtype, ga.dtype) == (dtype, torch.float32, torch.float32)


def test_float64_locations_with_float32_values_are_used_in_float32(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float32, lq=6)
    a = ms_deform_attn(value, shapes, None, loc.double(), attn.double())
    b = ms_deform_attn(value, shapes, None, loc, attn)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# Edge cases


def test_empty_queries_batch_points_and_channels(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float64, lq=0)
    v = value.requires_grad_()
    out = ms_deform_attn(v, shapes, None, loc.requires_grad_(), attn.requires_grad_())
    assert out.shape == (value.shape[0], 0, value.shape[2] * value.shape[3])
    out.sum().backward()
    assert (v.grad == 0).all() and v.grad.shape == value.shape
    # no batch
    out = ms_deform_attn(value[:0], shapes, None, loc[:0], attn[:0])
    assert out.shape == (0, 0, value.shape[2] * value.shape[3])
    # no points, no channels
    value, shapes, loc, attn = random_problem(gen, torch.float64, lq=3)
    assert (ms_deform_attn(value, shapes, None, loc[..., :0, :], attn[..., :0]) == 0).all()
    out = ms_deform_attn(value[..., :0], shapes, None, loc, attn)
    assert out.shape == (value.shape[0], 3, 0)


def test_single_pixel_levels(seed):
    """On a 1 x 1 level the bilinear sample at (x, y) is v * (1 - |x W - 1/2|)(1 - |y H - 1/2|)
    for |.| < 1: a tent centred on the pixel."""
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    shapes = [(1, 1), (1, 1)]
    loc = torch.rand(2, 5, 3, 2, 3, 2, generator=gen, dtype=torch.float64) * 2.2 - 0.6
    attn = torch.rand(2, 5, 3, 2, 3, generator=gen, dtype=torch.float64)
    out = ms_deform_attn(value, shapes, None, loc, attn)
    tent = ((1 - (loc - 0.5).abs()).clamp(min=0)).prod(-1)  # [N, Lq, M, L, P]
    expect = torch.einsum("nqmlp,nlmd->nqmd", tent * attn, value).reshape(2, 5, 12)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out, ms_deform_attn_reference(value, shapes, loc, attn), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nonfinite_and_far_outside_locations_contribute_zero(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, dtype, n=2, lq=8)
    bad = loc.clone()
    nan, inf = float("nan"), float("inf")
    specials = torch.tensor([nan, inf, -inf, 1e30, -1e30, 3e38, -3e38, 1e9, -1e9, 2.0, -1.5], dtype=torch.float64)
    mask = torch.rand(loc.shape[:-1], generator=gen) < 0.4
    pick = torch.randint(0, specials.numel(), loc.shape[:-1] + (2,), generator=gen)
    which = torch.randint(0, 3, loc.shape[:-1], generator=gen)  # x, y or both
    repl = specials[pick].to(dtype)
    for c in range(2):
        sel = mask & ((which == c) | (which == 2))
        bad[..., c] = torch.where(sel, repl[..., c], bad[..., c])
    v = value.clone().requires_grad_()
    lo, a = bad.clone().requires_grad_(), attn.clone().requires_grad_()
    out = ms_deform_attn(v, shapes, None, lo, a)
    # The same with those points' weights set to zero (and harmless locations).
    a0 = torch.where(mask, torch.zeros_like(attn), attn)
    l0 = torch.where(mask[..., None], torch.full_like(loc, 0.5), loc)
    expect = ms_deform_attn(value, shapes, None, l0, a0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    gv, gl, ga = torch.autograd.grad(out, (v, lo, a), torch.randn_like(out))
    assert torch.isfinite(gv).all() and torch.isfinite(gl).all() and torch.isfinite(ga).all()
    assert (gl[mask] == 0).all() and (ga[mask] == 0).all()
    if dtype == torch.float64:
        ref = ms_deform_attn_reference(value, shapes, bad, attn)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


def test_locations_on_the_border_band(seed):
    """Points within half a pixel outside the level still see the edge pixels (weights < 1),
    points beyond that see nothing: the (-1, H) x (-1, W) test in pixel coordinates."""
    gen = torch.Generator().manual_seed(seed)
    h, w = 4, 6
    value = torch.randn(1, h * w, 1, 3, generator=gen, dtype=torch.float64)
    xs = torch.tensor([-0.5 / w - 1e-9, -0.5 / w + 1e-9, -0.25 / w, 1 + 0.25 / w, 1 + 0.5 / w - 1e-9, 1 + 0.5 / w + 1e-9],
                      dtype=torch.float64)
    loc = torch.stack([xs, torch.full_like(xs, 0.5)], -1).view(1, -1, 1, 1, 1, 2)
    attn = torch.ones(1, xs.numel(), 1, 1, 1, dtype=torch.float64)
    out = ms_deform_attn(value, [(h, w)], None, loc, attn)
    torch.testing.assert_close(out, ms_deform_attn_reference(value, [(h, w)], loc, attn), rtol=1e-12, atol=1e-12)
    assert (out[0, 0] == 0).all() and (out[0, -1] == 0).all()
    assert (out[0, 1:-1].abs() > 0).any()


def test_batch_size_needs_no_im2col_step(seed):
    """Any batch size works, and each image is computed independently of the others."""
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float32, n=5, lq=6)
    out = ms_deform_attn(value, shapes, None, loc, attn)
    for i in range(5):
        assert torch.equal(out[i:i + 1], ms_deform_attn(value[i:i + 1], shapes, None, loc[i:i + 1], attn[i:i + 1]))


def test_result_independent_of_thread_count(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float32, n=2, lq=40, max_hw=12)
    g = torch.randn(value.shape[0], 40, value.shape[2] * value.shape[3], generator=gen)
    results = []
    prev = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            ins = [t.clone().requires_grad_() for t in (value, loc, attn)]
            out = ms_deform_attn(ins[0], shapes, None, ins[1], ins[2])
            results.append((out.detach(),) + torch.autograd.grad(out, ins, g))
    finally:
        torch.set_num_threads(prev)
    for r in results[1:]:
        for a, b in zip(r, results[0]):
            assert torch.equal(a, b)


def test_double_backward_matches_reference(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float64, n=1, lq=4)
    ins = [t.clone().requires_grad_() for t in (value, loc, attn)]
    ref_ins = [t.clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(ins[0], shapes, None, ins[1], ins[2])
    ref = ms_deform_attn_reference(ref_ins[0], shapes, ref_ins[1], ref_ins[2])
    g = torch.randn_like(out)
    first = torch.autograd.grad(out, ins, g, create_graph=True)
    ref_first = torch.autograd.grad(ref, ref_ins, g, create_graph=True)
    u = [torch.randn_like(f) for f in first]
    second = torch.autograd.grad(first, ins, u, allow_unused=True)
    ref_second = torch.autograd.grad(ref_first, ref_ins, u, allow_unused=True)
    for a, b in zip(second, ref_second):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_raise_clear_errors(seed):
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(2, 5 * 4 + 3 * 2, 2, 3, generator=gen)
    shapes = [(5, 4), (3, 2)]
    st_, lsi = tables(shapes)
    loc = torch.rand(2, 7, 2, 2, 3, 2, generator=gen)
    attn = torch.rand(2, 7, 2, 2, 3, generator=gen)
    op = torch.ops.instseg.ms_deform_attn

    def raises(match, *args):
        with pytest.raises(RuntimeError, match=match):
            op(*args, False)

    raises("value must be a 4-D", value[0], st_, lsi, loc, attn)
    raises(r"spatial_shapes must be a Tensor\[L, 2\]", value, st_[:, :1], lsi, loc, attn)
    raises(r"level_start_index must be a Tensor\[L\]", value, st_, lsi[:1], loc, attn)
    raises("sampling_locations must be a 6-D", value, st_, lsi, loc[0], attn)
    raises("attention_weights must be a 5-D", value, st_, lsi, loc, attn[0])
    raises("sampling_locations must have shape", value, st_, lsi, loc[:1], attn[:1])  # batch
    raises("sampling_locations must have shape", value, st_, lsi, loc[:, :, :1], attn[:, :, :1])  # heads
    raises("sampling_locations must have shape", value, st_, lsi, loc[:, :, :, :1], attn[:, :, :, :1])  # levels
    raises("sampling_locations must have shape", value, st_, lsi, loc[..., :1], attn)  # (x, y)
    raises("attention_weights must have shape", value, st_, lsi, loc, attn[:, :3])
    raises("attention_weights must have shape", value, st_, lsi, loc, attn[..., :2])
    raises("value must be a floating tensor", value.long(), st_, lsi, loc, attn)
    raises("sampling_locations must be a floating", value, st_, lsi, loc.long(), attn)
    raises("attention_weights must be a floating", value, st_, lsi, loc, attn.int())
    raises("spatial_shapes must be int64", value, st_.int(), lsi, loc, attn)
    raises("level_start_index must be int64", value, st_, lsi.int(), loc, attn)
    # Level tables that disagree with value or with each other.
    raises("exceed the 25 rows of value", value[:, :25], st_, lsi, loc, attn)
    raises("exceed the 26 rows", value, torch.tensor([[5, 4], [3, 3]]), lsi, loc, attn)
    raises("sum to 24 but value has S = 26", value, torch.tensor([[5, 4], [2, 2]]), lsi, loc, attn)
    raises(r"level_start_index\[1\] = 19 is inconsistent", value, st_, torch.tensor([0, 19]), loc, attn)
    raises(r"level_start_index\[0\] = 1 is inconsistent", value, st_, torch.tensor([1, 20]), loc, attn)
    raises("must not be negative", value, torch.tensor([[-5, -4], [3, 2]]), lsi, loc, attn)
    raises("exceed", value, torch.tensor([[2**40, 2**40], [3, 2]]), lsi, loc, attn)  # H * W overflows int64
    # The backward checks its inputs too.
    grad = torch.randn(2, 7, 6)
    bop = torch.ops.instseg._ms_deform_attn_backward
    with pytest.raises(RuntimeError, match=r"grad_output must have shape \[N, Lq, M \* D\]"):
        bop(grad[:, :3], value, st_, lsi, loc, attn, False)
    with pytest.raises(RuntimeError, match="grad_output must have the dtype of value"):
        bop(grad.double(), value, st_, lsi, loc, attn, False)
    with pytest.raises(RuntimeError, match="inconsistent"):
        bop(grad, value, st_, torch.tensor([0, 19]), loc, attn, False)
    # The wrapper builds the tables from pairs and checks them.
    with pytest.raises(ValueError, match=r"\(H, W\) pair"):
        ms_deform_attn(value, [(5, 4, 1), (3, 2)], None, loc, attn)
    with pytest.raises(RuntimeError, match="exceed the 26 rows"):
        ms_deform_attn(value, [(5, 4), (3, 3)], None, loc, attn)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="but spatial_shapes is on meta"):
            op(value, st_.to("meta"), lsi, loc, attn, False)


# ---------------------------------------------------------------------------
# Registration: compile and export of a module that uses the op


class _Layer(torch.nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.shapes = shapes
        self.attn = MSDeformAttn(d_model=16, n_levels=len(shapes), n_heads=2, n_points=3)

    def forward(self, query, ref, feats):
        return self.attn(query, ref, feats, self.shapes)


def _layer_inputs(gen, shapes, n=2, lq=5, dtype=torch.float32):
    s = sum(h * w for h, w in shapes)
    return (torch.randn(n, lq, 16, generator=gen, dtype=dtype),
            torch.rand(n, lq, len(shapes), 2, generator=gen, dtype=dtype),
            torch.randn(n, s, 16, generator=gen, dtype=dtype))


def test_torch_compile_fullgraph_forward_backward(seed):
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (3, 3)]
    layer = _Layer(shapes).double()
    for p in layer.parameters():  # random weights, so that every path is exercised
        torch.nn.init.normal_(p, std=0.3, generator=gen)
    q, ref, feats = (t.double() for t in _layer_inputs(gen, shapes))
    feats.requires_grad_()

    def loss(m, *a):
        return m(*a).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    l1 = compiled(layer, q, ref, feats)
    g1 = torch.autograd.grad(l1, [feats] + list(layer.parameters()))
    l2 = loss(layer, q, ref, feats)
    g2 = torch.autograd.grad(l2, [feats] + list(layer.parameters()))
    torch.testing.assert_close(l1, l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_torch_export(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (3, 3)]
    layer = _Layer(shapes).eval()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=gen)
    args = _layer_inputs(gen, shapes)
    ep = torch.export.export(layer, args)
    torch.testing.assert_close(ep.module()(*args), layer(*args))
    assert any("instseg.ms_deform_attn" in str(n.target) for n in ep.graph.nodes)


# ---------------------------------------------------------------------------
# Properties (hypothesis)

SETTINGS = settings(max_examples=40, deadline=None)
DEVICES = ["cpu"] + (["cuda"] if cuda_available() else [])


@st.composite
def problems(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    return random_problem(torch.Generator().manual_seed(seed), torch.float64, lq=draw(st.integers(1, 8)))


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems(), a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linear_in_value_and_weights(device, p, a, b):
    value, shapes, loc, attn = (t.to(device) if isinstance(t, torch.Tensor) else t for t in p)
    v2, w2 = torch.randn_like(value), torch.rand_like(attn)
    f = lambda v, w: ms_deform_attn(v, shapes, None, loc, w)  # noqa: E731
    torch.testing.assert_close(f(a * value + b * v2, attn), a * f(value, attn) + b * f(v2, attn), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(f(value, a * attn + b * w2), a * f(value, attn) + b * f(value, w2), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems(), data=st.data())
def test_permuting_queries_permutes_outputs(device, p, data):
    value, shapes, loc, attn = (t.to(device) if isinstance(t, torch.Tensor) else t for t in p)
    perm = torch.tensor(data.draw(st.permutations(range(loc.shape[1]))), device=device)
    out = ms_deform_attn(value, shapes, None, loc, attn)
    assert torch.equal(ms_deform_attn(value, shapes, None, loc[:, perm], attn[:, perm]), out[:, perm])


@pytest.mark.parametrize("device", DEVICES)
@SETTINGS
@given(p=problems())
def test_value_gradient_is_the_adjoint(device, p):
    """The op is linear in value: <op(v), g> = <v, grad_value(g)> for any v, g."""
    value, shapes, loc, attn = (t.to(device) if isinstance(t, torch.Tensor) else t for t in p)
    v = value.clone().requires_grad_()
    out = ms_deform_attn(v, shapes, None, loc, attn)
    g = torch.randn_like(out)
    (gv,) = torch.autograd.grad(out, v, g)
    torch.testing.assert_close((out * g).sum(), (value * gv).sum(), rtol=1e-10, atol=1e-10)


@SETTINGS
@given(p=problems())
def test_constant_levels_inside_give_the_weight_sum(p):
    """On a level of constant value c, a location whose four neighbours are all on the level
    samples exactly c, so the output is c times the sum of the weights."""
    value, shapes, loc, attn = p
    c = torch.randn(value.shape[2], value.shape[3], dtype=torch.float64)
    const = c.expand_as(value).contiguous()
    lo, hi = [], []
    for h, w in shapes:  # pixel centres: [0.5 / size, 1 - 0.5 / size]
        lo.append([0.5 / w, 0.5 / h])
        hi.append([1 - 0.5 / w, 1 - 0.5 / h])
    lo, hi = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    inside = lo[:, None] + loc.clamp(0, 1) * (hi - lo)[:, None]  # [N, Lq, M, L, P, 2] via broadcasting
    out = ms_deform_attn(const, shapes, None, inside, attn)
    expect = (attn.sum((-1, -2))[..., None] * c).flatten(-2)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# The module


def _hf_layer(d_model, n_levels, n_heads, n_points):
    cfg = hf_ddetr.DeformableDetrConfig(d_model=d_model, num_feature_levels=n_levels, encoder_n_points=n_points,
                                        decoder_n_points=n_points, encoder_attention_heads=n_heads,
                                        decoder_attention_heads=n_heads, use_timm_backbone=False,
                                        backbone_config=None)
    return hf_ddetr.DeformableDetrMultiscaleDeformableAttention(cfg, num_heads=n_heads, n_points=n_points)


def test_module_initialisation(seed):
    m = MSDeformAttn(d_model=36, n_levels=3, n_heads=6, n_points=2)
    assert {k for k, _ in m.named_parameters()} == {
        f"{a}.{b}" for a in ("sampling_offsets", "attention_weights", "value_proj", "output_proj")
        for b in ("weight", "bias")}
    assert (m.sampling_offsets.weight == 0).all() and (m.attention_weights.weight == 0).all()
    assert (m.attention_weights.bias == 0).all() and (m.value_proj.bias == 0).all() and (m.output_proj.bias == 0).all()
    bias = m.sampling_offsets.bias.view(6, 3, 2, 2)
    for h in range(6):
        theta = 2 * math.pi * h / 6
        d = torch.tensor([math.cos(theta), math.sin(theta)])
        d = d / d.abs().max()
        for p in range(2):
            torch.testing.assert_close(bias[h, :, p], (d * (p + 1)).expand(3, 2))
    # xavier-uniform bound
    assert m.value_proj.weight.abs().max() <= math.sqrt(6 / 72) + 1e-6
    assert "n_points=2" in repr(m)
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)


@needs_transformers
def test_module_initialisation_matches_transformers():
    cfg_args = dict(d_model=32, n_levels=3, n_heads=4, n_points=3)
    hf = _hf_layer(**cfg_args)
    cfg = hf_ddetr.DeformableDetrConfig(d_model=32, num_feature_levels=3, use_timm_backbone=False, backbone_config=None)
    hf_ddetr.DeformableDetrPreTrainedModel(cfg)._init_weights(hf)
    ours = MSDeformAttn(**cfg_args)
    torch.testing.assert_close(ours.sampling_offsets.bias, hf.sampling_offsets.bias)
    for name in ("sampling_offsets.weight", "attention_weights.weight", "attention_weights.bias"):
        assert torch.equal(ours.state_dict()[name], hf.state_dict()[name])


@needs_transformers
@pytest.mark.parametrize("ref_dim", [2, 4])
@pytest.mark.parametrize("padding", [False, True])
def test_module_matches_transformers(seed, ref_dim, padding):
    gen = torch.Generator().manual_seed(seed)
    d_model, n_levels, n_heads, n_points = 32, 3, 4, 3
    ours = MSDeformAttn(d_model, n_levels, n_heads, n_points).double()
    for p in ours.parameters():  # random weights: the initial ones make every query alike
        torch.nn.init.normal_(p, std=0.2, generator=gen)
    hf = _hf_layer(d_model, n_levels, n_heads, n_points).double()
    hf.load_state_dict(ours.state_dict())
    shapes = [(int(torch.randint(2, 9, (1,), generator=gen)), int(torch.randint(2, 9, (1,), generator=gen)))
              for _ in range(n_levels)]
    st_, lsi = tables(shapes)
    n, lq, s = 2, 11, int(sum(h * w for h, w in shapes))
    query = torch.randn(n, lq, d_model, generator=gen, dtype=torch.float64, requires_grad=True)
    feats = torch.randn(n, s, d_model, generator=gen, dtype=torch.float64, requires_grad=True)
    ref = torch.rand(n, lq, n_levels, ref_dim, generator=gen, dtype=torch.float64)
    if ref_dim == 4:
        ref[..., 2:] = ref[..., 2:] * 0.5 + 0.05
    mask = torch.rand(n, s, generator=gen) < 0.3 if padding else None
    out = ours(query, ref, feats, st_, lsi, mask)
    q2, f2 = query.detach().clone().requires_grad_(), feats.detach().clone().requires_grad_()
    expect, _ = hf(q2, attention_mask=None if mask is None else ~mask, encoder_hidden_states=f2,
                   reference_points=ref, spatial_shapes=st_, spatial_shapes_list=shapes, level_start_index=lsi)
    torch.testing.assert_close(out, expect, rtol=1e-11, atol=1e-11)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [query, feats] + list(ours.parameters()), g)
    hf_grads = torch.autograd.grad(expect, [q2, f2] + list(hf.parameters()), g)
    for a, b in zip(grads, hf_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # the list form of the shapes gives the same
    torch.testing.assert_close(ours(query, ref, feats, shapes, None, mask), out, rtol=0, atol=0)


def test_module_rejects_bad_reference_points():
    m = MSDeformAttn(16, 2, 2, 2)
    with pytest.raises(ValueError, match="2 or 4"):
        m(torch.randn(1, 3, 16), torch.rand(1, 3, 2, 3), torch.randn(1, 5, 16), [(2, 2), (1, 1)])


def test_module_under_cpu_autocast(seed):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (3, 3)]
    layer = _Layer(shapes)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3, generator=gen)
    args = _layer_inputs(gen, shapes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(*args)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), layer(*args), rtol=0.1, atol=0.1)


# ---------------------------------------------------------------------------
# CUDA against the CPU (skipped without a GPU)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_matches_cpu(seed, dtype, deterministic):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, dtype, n=2, lq=37, max_hw=20)
    cpu_ins = [t.clone().requires_grad_() for t in (value, loc, attn)]
    gpu_ins = [t.cuda().requires_grad_() for t in (value, loc, attn)]
    out_c = ms_deform_attn(cpu_ins[0], shapes, None, cpu_ins[1], cpu_ins[2])
    out_g = ms_deform_attn(gpu_ins[0], shapes, None, gpu_ins[1], gpu_ins[2], deterministic=deterministic)
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out_g.cpu(), out_c, rtol=tol, atol=tol)
    g = torch.randn(out_c.shape, generator=gen).to(dtype)
    for a, b in zip(torch.autograd.grad(out_g, gpu_ins, g.cuda()), torch.autograd.grad(out_c, cpu_ins, g)):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a.cpu(), b, rtol=tol * 4, atol=tol * 4 * scale)


@requires_cuda
def test_cuda_deterministic_backward_is_bitwise_repeatable(seed):
    gen = torch.Generator().manual_seed(seed)
    # Many queries on a small level: many samples share each pixel.
    value = torch.randn(2, 16 + 4, 4, 32, generator=gen).cuda()
    shapes = [(4, 4), (2, 2)]
    loc = torch.rand(2, 3000, 4, 2, 4, 2, generator=gen).cuda()
    attn = torch.rand(2, 3000, 4, 2, 4, generator=gen).cuda()
    g = torch.randn(2, 3000, 128, generator=gen).cuda()
    first = None
    for _ in range(3):
        ins = [t.clone().requires_grad_() for t in (value, loc, attn)]
        grads = torch.autograd.grad(ms_deform_attn(ins[0], shapes, None, ins[1], ins[2], deterministic=True), ins, g)
        if first is None:
            first = grads
        for a, b in zip(grads, first):
            assert torch.equal(a, b)


@requires_cuda
def test_cuda_follows_use_deterministic_algorithms(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = (t.cuda() if isinstance(t, torch.Tensor) else t
                                for t in random_problem(gen, torch.float32, n=2, lq=5))
    v = value.requires_grad_()
    prev = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        ms_deform_attn(v, shapes, None, loc, attn).sum().backward()  # deterministic=None follows the flag
        with pytest.raises(RuntimeError, match="deterministic"):
            ms_deform_attn(v, shapes, None, loc, attn, deterministic=False).sum().backward()
    finally:
        torch.use_deterministic_algorithms(prev)


@requires_cuda
def test_cuda_bad_level_table_raises_and_devices_must_agree(seed):
    gen = torch.Generator().manual_seed(seed)
    value, shapes, loc, attn = random_problem(gen, torch.float32, n=1, lq=3)
    st_, lsi = tables(shapes, "cuda")
    with pytest.raises(RuntimeError, match="inconsistent|sum to"):
        torch.ops.instseg.ms_deform_attn(value.cuda(), st_, lsi + 1, loc.cuda(), attn.cuda(), False)
    with pytest.raises(RuntimeError, match="is on"):
        torch.ops.instseg.ms_deform_attn(value.cuda(), st_.cpu(), lsi, loc.cuda(), attn.cuda(), False)
