"""instseg_ops used as torchvision.ops is used: scripted (torch.jit.script), traced
(torch.fx.symbolic_trace, torchvision's create_feature_extractor), exported to ONNX,
and torchvision's edge cases (empty batched_nms with None, quantized maps).

Every comparison runs on fresh random inputs (the ``seed`` fixture prints the seed);
scripted and traced outputs must equal eager ones bit for bit, and eager outputs are
checked against torchvision's where torchvision has the op.
"""
import io
import warnings
from collections import OrderedDict
from typing import Dict, List, Tuple

import pytest
import torch
import torchvision
from torch import Tensor, nn

import instseg_ops
from instseg_ops import (MultiScaleRoIAlign, RoIAlign, batched_nms, crops_to_canvas, multilevel_roi_align, nms,
                         paste_masks, paste_masks_crops, roi_align, soft_nms)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated",
                                        "ignore:`torch.jit.save` is deprecated", "ignore:`torch.jit.load` is deprecated",
                                        "ignore:.*TorchScript.*:DeprecationWarning", "ignore::FutureWarning",
                                        "ignore:torch.quantize_per_tensor:UserWarning", "ignore::torch.jit.TracerWarning")


def _script(obj):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.script(obj)


def _save_load(scripted):
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(scripted, buf)
        buf.seek(0)
        return torch.jit.load(buf)


def rand_boxes(n, size, lo=1.0):
    """Valid (x1 < x2, y1 < y2) float32 boxes inside a size x size image."""
    xy = torch.rand(n, 2) * (size - lo - 1)
    wh = lo + torch.rand(n, 2) * (size - xy - lo)
    return torch.cat([xy, xy + wh], dim=1)


def rand_rois(n, batch, size):
    return torch.cat([torch.randint(0, batch, (n, 1)).float(), rand_boxes(n, size)], dim=1)


def assert_same(a, b):
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------
# TorchScript


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_scripted(seed, aligned):
    x = torch.randn(2, 3, 17, 23)
    rois = rand_rois(11, 2, 40)
    per_image = [rand_boxes(5, 40), rand_boxes(3, 40)]
    f = _script(roi_align)
    for boxes, size, scale, ratio in ((rois, 5, 0.5, 2), (per_image, (4, 3), 0.5, -1), (rois, [3], 0.25, 0)):
        eager = roi_align(x, boxes, size, scale, ratio, aligned)
        assert_same(f(x, boxes, size, scale, ratio, aligned), eager)
        assert_same(f(x, boxes, size, scale, ratio, aligned, True), eager)
        tv_size = size[0] if isinstance(size, list) else size  # torchvision's eager path takes no [n]
        tv = torchvision.ops.roi_align(x, boxes, tv_size, scale, ratio, aligned)
        torch.testing.assert_close(eager, tv, rtol=1e-5, atol=1e-5)


def test_roi_align_keyword_api_unchanged(seed):
    # deterministic used to be keyword-only: keywords keep working.
    x = torch.randn(1, 2, 9, 9)
    rois = rand_rois(4, 1, 9)
    ref = roi_align(x, rois, 3, 1.0, 2, True)
    assert_same(roi_align(x, rois, output_size=3, spatial_scale=1.0, sampling_ratio=2, aligned=True,
                          deterministic=True), ref)
    feats = [torch.randn(1, 2, 16, 16), torch.randn(1, 2, 8, 8)]
    boxes = [rand_boxes(6, 64)]
    out = multilevel_roi_align(feats, boxes, 2, [0.25, 0.125], rule="scale_adaptive", min_level=2, max_level=3,
                               image_sizes=[(64, 64)], deterministic=False)
    assert out.shape == (6, 2, 2, 2)


class _Head(nn.Module):
    """A scripted model using the modules the way torchvision's detection heads do."""

    def __init__(self, pool: nn.Module):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = pool

    def forward(self, x: Tensor, boxes: List[Tensor]) -> Tensor:
        return self.pool(self.conv(x), boxes).flatten(1).relu()


def test_roialign_module_in_scripted_model(seed):
    for pool in (RoIAlign(3, 0.5, 2), RoIAlign((4, 2), 0.5, -1, aligned=True)):
        model = _Head(pool).eval()
        scripted = _save_load(_script(model))
        x = torch.randn(2, 3, 20, 16)
        boxes = [rand_boxes(4, 30), rand_boxes(2, 30)]
        with torch.no_grad():
            assert_same(scripted(x, boxes), model(x, boxes))
    # torchvision's module and ours, scripted, give the same numbers
    tv = _script(torchvision.ops.RoIAlign(3, 0.5, 2))
    ours = _script(RoIAlign(3, 0.5, 2))
    x, rois = torch.randn(2, 3, 12, 12), rand_rois(7, 2, 24)
    torch.testing.assert_close(ours(x, rois), tv(x, rois), rtol=1e-5, atol=1e-5)


class _Pooler(nn.Module):
    def __init__(self, pool: nn.Module):
        super().__init__()
        self.pool = pool

    def forward(self, feats: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        return self.pool(feats, boxes, image_shapes) * 2


def _fpn_inputs(batch=2, c=3, size=128):
    feats = OrderedDict((str(i), torch.randn(batch, c, size // 4 >> i, size // 4 >> i)) for i in range(4))
    feats["pool"] = torch.randn(batch, c, 1, 1)
    boxes = [rand_boxes(9, size, lo=2.0), rand_boxes(5, size - 10, lo=2.0)]
    return feats, boxes, [(size, size), (size - 10, size - 6)]


def test_multiscale_roi_align_scripted(seed):
    feats, boxes, shapes = _fpn_inputs()
    for pool in (MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2), MultiScaleRoIAlign(["2"], (3, 5), 2),
                 MultiScaleRoIAlign(["0", "1", "2"], 4, -1, rule="scale_adaptive", aligned=True)):
        model = _Pooler(pool)
        scripted = _save_load(_script(model))
        assert_same(scripted(feats, boxes, shapes), model(feats, boxes, shapes))
    tv = _script(torchvision.ops.MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2))
    ours = _script(MultiScaleRoIAlign(["0", "1", "2", "3"], 7, 2))
    torch.testing.assert_close(ours(feats, boxes, shapes), tv(feats, boxes, shapes), rtol=1e-5, atol=1e-5)


def test_multilevel_functions_scripted(seed):
    feats, boxes, shapes = _fpn_inputs()
    fl = [feats[str(i)] for i in range(4)]
    scales = [0.25, 0.125, 0.0625, 0.03125]
    f = _script(multilevel_roi_align)
    assert_same(f(fl, boxes, 5, scales), multilevel_roi_align(fl, boxes, 5, scales))
    assert_same(f(fl, boxes, [5, 3], scales, 2, True, None, "scale_adaptive", 2, 5, 224.0, 4.0, 1e-6, shapes),
                multilevel_roi_align(fl, boxes, (5, 3), scales, 2, True, rule="scale_adaptive", min_level=2,
                                     max_level=5, image_sizes=shapes))
    g = _script(instseg_ops.assign_levels)
    rois = torch.cat(boxes)
    assert_same(g(rois, 2, 5), instseg_ops.assign_levels(rois, 2, 5))


def _nms_inputs(n=60):
    boxes = rand_boxes(n, 50, lo=3.0)
    return boxes, torch.rand(n), torch.randint(0, 4, (n,))


def test_nms_scripted(seed):
    boxes, scores, idxs = _nms_inputs()
    f, g, h = _script(nms), _script(batched_nms), _script(soft_nms)
    assert_same(f(boxes, scores, 0.4), nms(boxes, scores, 0.4))
    assert_same(f(boxes, scores, 0.4, 5, 0.3), nms(boxes, scores, 0.4, 5, 0.3))
    assert_same(f(boxes, scores, 0.4), torchvision.ops.nms(boxes, scores, 0.4))  # distinct random scores
    assert_same(g(boxes, scores, idxs, 0.4), batched_nms(boxes, scores, idxs, 0.4))
    assert_same(g(boxes, scores, idxs, 0.4), torchvision.ops.batched_nms(boxes, scores, idxs, 0.4))
    assert_same(h(boxes, scores, 0.3, 0.5, 0.01, "gaussian"), soft_nms(boxes, scores, 0.3, 0.5, 0.01, "gaussian"))
    with pytest.raises(Exception, match="linear"):
        h(boxes, scores, 0.3, 0.5, 0.01, "cubic")


def test_paste_scripted(seed):
    masks = torch.rand(6, 1, 9, 9)
    boxes = rand_boxes(6, 40, lo=2.0)
    f, g, c = _script(paste_masks), _script(paste_masks_crops), _script(crops_to_canvas)
    for args in (((37, 41),), ((37, 41), 1, 0.5, True), ((20, 30), 2, None, False)):
        assert_same(f(masks, boxes, *args), paste_masks(masks, boxes, *args))
        crops, regions = g(masks, boxes, *args)
        assert_same((crops, regions), paste_masks_crops(masks, boxes, *args))
        assert_same(c(crops, regions, args[0]), crops_to_canvas(crops, regions, args[0]))


# ---------------------------------------------------------------------------
# torch.fx


class _UsesFunctions(nn.Module):
    """Calls the functions through names imported from the package (not through the module
    that defines them), as user code does."""

    def forward(self, x, rois, boxes, scores, idxs, masks):
        pooled = roi_align(x, rois, (3, 2), 0.5, 2, True) + 1
        keep = batched_nms(boxes, scores, idxs, 0.5)
        keep2 = instseg_ops.nms(boxes, scores, 0.3, 10)
        kept, kept_scores = soft_nms(boxes, scores)
        levels = instseg_ops.assign_levels(boxes, 2, 5)
        multi = multilevel_roi_align([x, x[:, :, ::2, ::2]], rois, 2, [0.5, 0.25], 2)
        canvas = paste_masks(masks, boxes, (40, 40))
        crops, regions = paste_masks_crops(masks, boxes, (40, 40), 1, 0.5)
        return pooled, keep, keep2, kept, kept_scores, levels, multi, canvas, crops, regions


def test_fx_symbolic_trace_leaves(seed):
    model = _UsesFunctions()
    gm = torch.fx.symbolic_trace(model)
    # (the target may be torch.fx.wrap's wrapper of the function)
    targets = [getattr(n.target, "__wrapped__", n.target) for n in gm.graph.nodes if n.op == "call_function"]
    for fn in (roi_align, batched_nms, nms, soft_nms, instseg_ops.assign_levels, multilevel_roi_align, paste_masks,
               paste_masks_crops):
        assert fn in targets, f"{fn.__name__} is not a leaf of the trace"
    x, rois = torch.randn(2, 3, 15, 15), rand_rois(6, 2, 30)
    boxes, scores, idxs = _nms_inputs(30)
    masks = torch.rand(30, 7, 7)
    assert_same(gm(x, rois, boxes, scores, idxs, masks), model(x, rois, boxes, scores, idxs, masks))


def test_fx_modules(seed):
    for model, inputs in ((RoIAlign(3, 0.5, 2), (torch.randn(2, 3, 10, 10), rand_rois(5, 2, 20))),
                          (MultiScaleRoIAlign(["0", "1", "2", "3"], 5, 2), _fpn_inputs()),
                          (_Pooler(MultiScaleRoIAlign(["1", "3"], 2, -1)), _fpn_inputs())):
        gm = torch.fx.symbolic_trace(model)
        assert_same(gm(*inputs), model(*inputs))


class _FeatureModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.box_pool = RoIAlign(3, 1.0, 2)
        self.fpn_pool = MultiScaleRoIAlign(["p2", "p3"], 2, 2)

    def forward(self, x: Tensor, boxes: List[Tensor]):
        p2 = self.body(x)
        p3 = self.down(p2)
        a = self.box_pool(p2, boxes)
        b = self.fpn_pool({"p2": p2, "p3": p3}, boxes, [(x.shape[-2], x.shape[-1])] * 2)
        head = torch.cat([a.flatten(1), b.flatten(1)], 1)
        return head.sum(1)


def test_create_feature_extractor(seed):
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    model = _FeatureModel().eval()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert "cat" in eval_nodes
    extractor = create_feature_extractor(model, return_nodes={"cat": "head", "sum": "out"})
    x = torch.randn(2, 3, 16, 16)
    boxes = [rand_boxes(3, 16), rand_boxes(4, 16)]
    with torch.no_grad():
        got = extractor(x, boxes)
        p2 = model.body(x)
        p3 = model.down(p2)
        a = roi_align(p2, boxes, 3, 1.0, 2)
        b = torchvision.ops.MultiScaleRoIAlign(["p2", "p3"], 2, 2)({"p2": p2, "p3": p3}, boxes, [(16, 16)] * 2)
        head = torch.cat([a.flatten(1), b.flatten(1)], 1)
    torch.testing.assert_close(got["head"], head, rtol=1e-5, atol=1e-5)
    assert_same(got["out"], model(x, boxes))
    # torchvision's own tests script the extracted model: the FX nodes point at the functions
    scripted = _script(extractor)
    x, boxes = torch.randn(2, 3, 16, 16), [rand_boxes(5, 16), rand_boxes(2, 16)]
    with torch.no_grad():
        assert_same(scripted(x, boxes)["head"], extractor(x, boxes)["head"])


def test_script_fx_traced_functions(seed):
    gm = _script(torch.fx.symbolic_trace(_UsesFunctions()))
    x, rois = torch.randn(2, 3, 15, 15), rand_rois(6, 2, 30)
    boxes, scores, idxs = _nms_inputs(30)
    masks = torch.rand(30, 7, 7)
    assert_same(gm(x, rois, boxes, scores, idxs, masks), _UsesFunctions()(x, rois, boxes, scores, idxs, masks))


class _TracedNms(nn.Module):
    def forward(self, boxes, scores, idxs):
        return batched_nms(boxes, scores, idxs, 0.5), nms(boxes, scores, 0.3)


def test_jit_trace(seed):
    # torch.jit.trace records the op calls; the traced module runs on inputs of other sizes
    pool = RoIAlign((3, 2), 0.5, 2, aligned=True)
    traced = torch.jit.trace(pool, (torch.randn(2, 3, 10, 10), rand_rois(5, 2, 20)))
    x, rois = torch.randn(2, 3, 12, 9), rand_rois(9, 2, 20)
    assert_same(_save_load(traced)(x, rois), pool(x, rois))
    traced = torch.jit.trace(_TracedNms(), _nms_inputs(30))
    inputs = _nms_inputs(70)
    assert_same(traced(*inputs), _TracedNms()(*inputs))


# ---------------------------------------------------------------------------
# Edge cases torchvision users meet


def test_batched_nms_empty_like_torchvision():
    for boxes in (torch.empty(0, 4), torch.empty(0, 4, dtype=torch.float64), torch.empty(0)):
        assert_same(batched_nms(boxes, None, None, 0.5), torchvision.ops.batched_nms(boxes, None, None, 0.5))
    for dtype in (torch.float32, torch.float64):
        boxes, scores = torch.empty(0, 4, dtype=dtype), torch.empty(0, dtype=dtype)
        for idxs in (torch.empty(0, dtype=torch.int64), torch.empty(0), torch.empty(0, dtype=torch.bool)):
            assert_same(batched_nms(boxes, scores, idxs, 0.5), torchvision.ops.batched_nms(boxes, scores, idxs, 0.5))
    # Deliberate difference: torchvision returns an empty result for empty boxes with scores of
    # another length; here the shape mismatch raises (checking numel() first would be a
    # data-dependent guard under torch.compile).
    with pytest.raises(RuntimeError, match="one score per box"):
        batched_nms(torch.empty(0, 4), torch.rand(3), torch.zeros(3, dtype=torch.int64), 0.5)
    with pytest.raises(ValueError, match="must be tensors"):
        batched_nms(torch.rand(3, 4), None, None, 0.5)


@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_quantized_like_torchvision(seed, aligned):
    x = torch.rand(1, 3, 12, 10) * 4 - 1
    qx = torch.quantize_per_tensor(x, 0.02, 60, torch.quint8)
    rois = rand_rois(20, 1, 12)
    qrois = torch.quantize_per_tensor(rois, 0.05, 0, torch.quint8)
    ours = roi_align(qx, qrois, 3, 0.8, 2, aligned)
    tv = torchvision.ops.roi_align(qx, qrois, 3, 0.8, 2, aligned)
    assert ours.is_quantized and ours.dtype == torch.quint8
    assert (ours.q_scale(), ours.q_zero_point()) == (tv.q_scale(), tv.q_zero_point())
    # float accumulation order can move a value across a rounding boundary: at most one step
    diff = (ours.int_repr().int() - tv.int_repr().int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02


@pytest.mark.parametrize("dtype", [torch.quint8, torch.qint8])
def test_roi_align_quantized_batches_and_float_rois(seed, dtype):
    # Beyond torchvision (one image, quantized rois only): several images, float rois.
    x = torch.rand(3, 2, 11, 13) * 2 - 1
    qx = torch.quantize_per_tensor(x, 0.01, 0 if dtype == torch.qint8 else 100, dtype)
    rois = rand_rois(15, 3, 12)
    out = roi_align(qx, rois, (2, 3), 1.0, -1, True)
    ref = torch.quantize_per_tensor(roi_align(qx.dequantize(), rois, (2, 3), 1.0, -1, True), 0.01,
                                    qx.q_zero_point(), dtype)
    diff = (out.int_repr().int() - ref.int_repr().int()).abs()
    assert out.dtype == dtype and diff.max() <= 1
    scripted = _script(roi_align)
    assert torch.equal(scripted(qx, rois, [2, 3], 1.0, -1, True).int_repr(), out.int_repr())
    per_channel = torch.quantize_per_channel(x, torch.full((2,), 0.01), torch.zeros(2, dtype=torch.long), 1, dtype)
    with pytest.raises(NotImplementedError, match="per tensor"):
        roi_align(per_channel, rois, 2)


# ---------------------------------------------------------------------------
# ONNX (torch.onnx.export with the torch.export-based exporter; run with onnxruntime)


def _onnx_session(model, args, dynamic_shapes, plain=False):
    """``plain``: torch.onnx.export itself (the translations registered on import of
    instseg_ops.onnx); else instseg_ops.onnx.export (passes them as custom_translation_table)."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import instseg_ops.onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if plain:
            assert instseg_ops.onnx.register()
            program = torch.onnx.export(model, args, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False)
        else:
            program = instseg_ops.onnx.export(model, args, dynamic_shapes=dynamic_shapes, verbose=False)
    return ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _onnx_run(session, args):
    flat = [a for a in args if isinstance(a, Tensor)]
    return session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), flat)})


class _RoiAlignVariants(nn.Module):
    def forward(self, x, rois, x16, boxes0, boxes1):
        return (roi_align(x, rois, (5, 4), 0.5, 2, False), roi_align(x, rois, 3, 0.5, -1, False),
                roi_align(x, rois, (2, 3), 0.25, 3, True), roi_align(x, rois, 4, 0.5, 0, True),
                roi_align(x16, rois, 3, 0.5, 2, True), RoIAlign(3, 0.5, -1)(x, [boxes0, boxes1]))


def test_onnx_roi_align(seed):
    from torch.export import Dim

    model = _RoiAlignVariants()

    def inputs(k):
        return (torch.randn(2, 3, 20, 24), rand_rois(k, 2, 48), torch.randn(2, 3, 20, 24).half(),
                rand_boxes(k // 2, 48), rand_boxes(k - k // 2, 48))

    k, k0, k1 = Dim("k"), Dim("k0"), Dim("k1")
    session = _onnx_session(model, inputs(12), ({}, {0: k}, {}, {0: k0}, {0: k1}))
    for n in (17, 30):  # fresh inputs, other RoI counts
        args = inputs(n)
        got = _onnx_run(session, args)
        want = model(*args)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == tuple(w.shape) and str(g.dtype) == str(w.dtype).replace("torch.", "")
            tol = 2e-3 if w.dtype == torch.float16 else 2e-5
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=tol, atol=tol)


class _FixedImages(nn.Module):
    def __init__(self, pool: nn.Module, image_shapes: List[Tuple[int, int]]):
        super().__init__()
        self.pool = pool
        self.image_shapes = image_shapes

    def forward(self, feats: Dict[str, Tensor], boxes: List[Tensor]) -> Tensor:
        return self.pool(feats, boxes, self.image_shapes)


def test_onnx_multiscale_roi_align(seed):
    from torch.export import Dim

    names = ["0", "1", "2", "3"]
    model = _FixedImages(MultiScaleRoIAlign(names, (3, 2), 2), [(512, 512), (500, 480)])

    def inputs(n0, n1):
        feats = {name: torch.randn(2, 3, 128 >> i, 128 >> i) for i, name in enumerate(names)}
        boxes = [rand_boxes(n0, 500, lo=8.0), rand_boxes(n1, 500, lo=8.0)]
        # squares of sides 40, 150, 300 and 480 at random places: levels 2, 3, 4 and 5 in every call
        sides = torch.tensor([40.0, 150.0, 300.0, 480.0])
        xy = torch.rand(4, 2) * (500 - sides[:, None])
        boxes[0][:4] = torch.cat([xy, xy + sides[:, None]], dim=1)
        return feats, boxes

    session = _onnx_session(model, inputs(10, 7), ({name: {} for name in names}, [{0: Dim("k0")}, {0: Dim("k1")}]))
    for n0, n1 in ((40, 23), (15, 31)):
        feats, boxes = inputs(n0, n1)
        assert instseg_ops.assign_levels(boxes, 2, 5).unique().numel() == 4  # every level is used
        got = _onnx_run(session, [feats[name] for name in names] + boxes)[0]
        torch.testing.assert_close(torch.from_numpy(got), model(feats, boxes), rtol=2e-5, atol=2e-5)


class _NmsVariants(nn.Module):
    def forward(self, boxes, scores, idxs):
        # Thresholds exact in float32: onnxruntime compares the IoU with a float32 threshold, the op
        # with the float64 one (an IoU equal to float32(0.3) is suppressed here, kept there).
        return (nms(boxes, scores, 0.5), batched_nms(boxes, scores, idxs, 0.375), nms(boxes, scores, 0.25, 7, 0.25),
                batched_nms(boxes, scores, idxs, 0.625, 10, 0.5), batched_nms(boxes, scores, idxs == 2, 0.5))


def test_onnx_nms(seed):
    from torch.export import Dim

    model = _NmsVariants()

    def inputs(n):
        return rand_boxes(n, 40, lo=6.0), torch.rand(n), torch.randint(0, 4, (n,)) * 3 - 2

    n = Dim("n")
    session = _onnx_session(model, inputs(30), ({0: n}, {0: n}, {0: n}), plain=True)
    for trial in range(3):
        boxes, scores, idxs = inputs(60 + 20 * trial)
        if trial == 2:
            scores[:30] = scores[30:60]  # tied scores
            boxes[3, 1] = float("nan")
            boxes[8, 2] = float("inf")
            scores[5] = float("nan")
        got = _onnx_run(session, (boxes, scores, idxs))
        want = model(boxes, scores, idxs)
        assert want[0].numel() < boxes.shape[0] - 5  # boxes were suppressed
        for g, w in zip(got, want):
            assert_same(torch.from_numpy(g), w)


class _PasteVariants(nn.Module):
    def forward(self, masks, boxes):
        return (paste_masks(masks, boxes, (37, 45)), paste_masks(masks[:, None], boxes, (37, 45), 2, 0.5),
                paste_masks(masks, boxes, (30, 28), 1, None, True), paste_masks(masks, boxes, (37, 45), 1, 0.3, True))


def test_onnx_paste_masks(seed):
    from torch.export import Dim

    model = _PasteVariants()

    def inputs(n):
        boxes = rand_boxes(n, 60, lo=0.5) - 8  # some boxes cross the image borders
        return torch.rand(n, 9, 9), boxes

    n = Dim("n")
    session = _onnx_session(model, inputs(6), ({0: n}, {0: n}))
    for count in (20, 33):
        masks, boxes = inputs(count)
        boxes[3, 0] = float("nan")  # pastes nothing
        got = _onnx_run(session, (masks, boxes))
        want = model(masks, boxes)
        for g, w in zip(got, want):
            g = torch.from_numpy(g)
            assert g.dtype == w.dtype and g.shape == w.shape
            if w.dtype == torch.bool:
                # equal except where the value is within float rounding of the threshold
                if w is want[1]:
                    probs, thr = paste_masks(masks, boxes, (37, 45), 2), 0.5
                else:
                    probs, thr = paste_masks(masks, boxes, (37, 45), 1, None, True), 0.3
                near = (probs - thr).abs() < 1e-5
                assert torch.equal(g[~near], w[~near])
            else:
                torch.testing.assert_close(g, w, rtol=0, atol=1e-6)


class _Detections(nn.Module):
    """The Mask R-CNN's output dict for one image, as a tuple (ONNX outputs are flat)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: Tensor):
        r = self.model([image])[0]
        return r["boxes"], r["labels"], r["scores"], r["masks"]


def test_onnx_mask_rcnn_end_to_end(seed):
    """The whole eval-mode model (transform, backbone, RPN with batched NMS, FPN RoIAlign,
    heads, per-class NMS, mask paste) exports unchanged and gives the same detections."""
    from instseg_ops.models import maskrcnn_resnet_fpn

    model = maskrcnn_resnet_fpn(depth=18, num_classes=5, min_size=128, max_size=128, rpn_pre_nms_top_n_test=100,
                                rpn_post_nms_top_n_test=50, box_score_thresh=0.0, box_detections_per_img=20).eval()
    wrapped = _Detections(model)
    session = _onnx_session(wrapped, (torch.rand(3, 128, 128),), None)
    for _ in range(2):
        image = torch.rand(3, 128, 128)  # fresh image: the number of proposals and detections is data-dependent
        with torch.no_grad():
            want = wrapped(image)
        got = [torch.from_numpy(g) for g in _onnx_run(session, (image,))]
        assert [g.shape for g in got] == [w.shape for w in want]
        # Detections whose scores differ by float rounding may come in the other order: pair
        # each with the eager detection of the same label and nearest box, one to one.
        dist = (got[0][:, None] - want[0][None]).abs().amax(2) + 1e9 * (got[1][:, None] != want[1][None])
        match = dist.argmin(1)
        assert torch.equal(match.sort().values, torch.arange(len(match)))
        assert torch.equal(got[1], want[1][match])  # labels
        torch.testing.assert_close(got[0], want[0][match], rtol=1e-5, atol=1e-3)  # boxes (pixels)
        torch.testing.assert_close(got[2], want[2][match], rtol=1e-4, atol=1e-5)  # scores
        torch.testing.assert_close(got[3], want[3][match], rtol=0, atol=1e-3)  # pasted mask probabilities


class _LegacyVariants(nn.Module):
    def forward(self, x, rois, x16, boxes, scores, idxs):
        return (roi_align(x, rois, 3, 0.5, 2, True), roi_align(x, rois, (2, 4), 0.5, -1, False),
                roi_align(x16, rois, 3, 0.5, 2, True), nms(boxes, scores, 0.5), batched_nms(boxes, scores, idxs, 0.375),
                nms(boxes, scores, 0.25, 7, 0.25))


@pytest.mark.parametrize("opset", [16, 18])
def test_onnx_torchscript_exporter(seed, opset):
    """torch.onnx.export(..., dynamo=False), for which torchvision registers its ops too."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    import instseg_ops.onnx

    assert instseg_ops.onnx.register_legacy()
    model = _LegacyVariants()

    def inputs(k, n):
        return (torch.randn(2, 3, 10, 12), rand_rois(k, 2, 20), torch.randn(2, 3, 10, 12).half(),
                rand_boxes(n, 40, lo=6.0), torch.rand(n), torch.randint(0, 4, (n,)) * 3)

    names = ["x", "rois", "x16", "boxes", "scores", "idxs"]
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, inputs(5, 30), buf, dynamo=False, opset_version=opset, input_names=names,
                          dynamic_axes={"rois": {0: "k"}, "boxes": {0: "n"}, "scores": {0: "n"}, "idxs": {0: "n"}})
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    for k, n in ((9, 60), (14, 45)):
        args = inputs(k, n)
        got = session.run(None, {name: a.numpy() for name, a in zip(names, args)})
        want = model(*args)
        for g, w in zip(got[:3], want[:3]):
            tol = 2e-3 if w.dtype == torch.float16 else 2e-5
            torch.testing.assert_close(torch.from_numpy(g), w, rtol=tol, atol=tol)
        assert want[3].numel() < n - 5  # boxes were suppressed
        for g, w in zip(got[3:], want[3:]):
            assert_same(torch.from_numpy(g), w)
