"""ONNX export of the instseg ops through ``torch.onnx.export(..., dynamo=True)``.

    import instseg_ops.onnx
    onnx_program = instseg_ops.onnx.export(model, (x, boxes))      # or:
    torch.onnx.export(model, (x, boxes), dynamo=True,
                      custom_translation_table=instseg_ops.onnx.translation_table())

The torch.export-based exporter records each ``torch.ops.instseg.*`` call as one node;
this module maps those nodes to ONNX (written with onnxscript, imported only here):

- ``instseg::roi_align`` -> ``RoiAlign`` (opset 16+): ``aligned=True`` is
  ``coordinate_transformation_mode="half_pixel"``, ``aligned=False`` is
  ``"output_half_pixel"`` (no shift, RoIs at least 1x1: the same rule), and
  ``sampling_ratio <= 0`` is ONNX's adaptive ``0`` (``ceil(roi_size / output_size)``).
  float16/bfloat16 maps are pooled in float32 (onnxruntime's CPU RoiAlign takes float32
  and float64) and cast back.
- ``instseg::multilevel_roi_align`` -> per level, the RoIs of that level (``NonZero``,
  ``Gather``), ``RoiAlign`` on them and ``ScatterND`` into the output, which is in RoI order.
- ``instseg::nms`` -> ``NonMaxSuppression`` (one class, or one class per distinct
  ``idxs`` value for ``batched_nms``), then sorted as ``nms`` sorts (score descending,
  ties by lower index). Boxes with a non-finite coordinate or a NaN score are masked out
  first, as the op drops them.
- ``instseg::paste_masks`` -> per mask ``Wy @ mask @ Wx^T`` (``MatMul``) with dense bilinear
  weights built from the kernels' float32 geometry (both modes).

Differences from eager (see the README): out-of-range batch or level indices are not
checked; a NaN box is not zeroed; in NMS the IoU threshold is compared in float32 (the op
compares in float64), boxes are used in float32 (also float64 ones), boxes with
``x1 > x2`` are normalised by onnxruntime (the op uses the signed area, as torchvision),
and boxes with a score of ``-inf`` are dropped (the op keeps them, last).
``soft_nms`` and ``paste_masks_crops`` have no ONNX translation. ``roi_align`` and ``nms`` are
also registered for the TorchScript-based exporter (``dynamo=False``, opset >= 16).
"""
from typing import Callable, Dict, Optional

import torch

_FLOAT, _INT64, _DOUBLE, _BOOL = 1, 7, 11, 9  # onnx.TensorProto data types
_FLOAT_MAX = 3.4028234663852886e38


def _op():
    from onnxscript import opset18

    return opset18


def _pooling_dtype(x):
    """ONNX dtype RoiAlign runs in for map ``x``: float32 unless the map is float64."""
    import onnx_ir as ir

    return _DOUBLE if x.dtype == ir.DataType.DOUBLE else _FLOAT


def _needs_cast(x) -> bool:
    import onnx_ir as ir

    return x.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE)


def _split_rois(op, rois, compute_dtype):
    batch = op.Cast(op.Squeeze(op.Slice(rois, [0], [1], [1]), [1]), to=_INT64)
    coords = op.Cast(op.Slice(rois, [1], [5], [1]), to=compute_dtype)
    return batch, coords


def _roi_align_value(op, x, coords, batch, spatial_scale, ph, pw, sampling_ratio, aligned):
    return op.RoiAlign(x, coords, batch, coordinate_transformation_mode="half_pixel" if aligned else
                       "output_half_pixel", mode="avg", output_height=int(ph), output_width=int(pw),
                       sampling_ratio=max(int(sampling_ratio), 0), spatial_scale=float(spatial_scale))


# (The translations carry no type annotations: onnxscript's registry parses them.)
def roi_align_to_onnx(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                      deterministic=False):
    op = _op()
    dt = _pooling_dtype(input)
    x = op.Cast(input, to=dt) if _needs_cast(input) else input
    batch, coords = _split_rois(op, rois, dt)
    out = _roi_align_value(op, x, coords, batch, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
    return op.CastLike(out, input) if _needs_cast(input) else out


def multilevel_roi_align_to_onnx(features, rois, levels, spatial_scales, pooled_height, pooled_width,
                                 sampling_ratio, aligned, deterministic=False):
    op = _op()
    f0 = features[0]
    dt = _pooling_dtype(f0)
    cast = _needs_cast(f0)
    batch, coords = _split_rois(op, rois, dt)
    # Output [K, C, ph, pw] of zeros, filled level by level.
    shape = op.Concat(op.Shape(rois, start=0, end=1), op.Shape(f0, start=1, end=2),
                      op.Constant(value_ints=[int(pooled_height), int(pooled_width)]), axis=0)
    out = op.Expand(op.CastLike(op.Constant(value_float=0.0), op.Cast(f0, to=dt) if cast else f0), shape)
    levels = op.Cast(levels, to=_INT64)
    for lvl, (feat, scale) in enumerate(zip(features, spatial_scales)):
        idx = op.NonZero(op.Equal(levels, op.Constant(value_int=lvl)))  # [1, n_l]
        flat = op.Reshape(idx, op.Constant(value_ints=[-1]))
        x = op.Cast(feat, to=dt) if cast else feat
        pooled = _roi_align_value(op, x, op.Gather(coords, flat, axis=0), op.Gather(batch, flat, axis=0), scale,
                                  pooled_height, pooled_width, sampling_ratio, aligned)
        out = op.ScatterND(out, op.Transpose(idx, perm=[1, 0]), pooled)
    return op.CastLike(out, f0) if cast else out


def nms_to_onnx(boxes, scores, idxs, iou_threshold, max_output=-1, score_threshold=None):
    op = _op()
    b = op.Cast(boxes, to=_FLOAT)
    s = op.Cast(scores, to=_FLOAT)
    # Never kept: a non-finite coordinate (x * 0 is NaN for inf and NaN), a NaN score, and
    # scores below score_threshold (compared in float64, as the op compares).
    bad = op.Or(op.IsNaN(op.ReduceSum(op.Mul(b, op.Constant(value_float=0.0)), op.Constant(value_ints=[1]),
                                      keepdims=0)), op.IsNaN(s))
    if score_threshold is not None:
        import numpy as np
        import onnx_ir as ir

        thr = op.Constant(value=ir.tensor(np.array(float(score_threshold), dtype=np.float64)))
        bad = op.Or(bad, op.Less(op.Cast(scores, to=_DOUBLE), thr))
    neg_inf = op.Constant(value_float=float("-inf"))
    s = op.Where(bad, neg_inf, s)
    if idxs is None:
        per_class = op.Unsqueeze(s, op.Constant(value_ints=[0, 1]))  # [1, 1, N]
    else:
        # One class row per distinct category; a box scores -inf in the rows of other categories.
        _, _, inverse, _ = op.Unique(op.Cast(idxs, to=_INT64), sorted=1)
        n_cls = op.Add(op.ReduceMax(inverse, keepdims=1), op.Constant(value_ints=[1]))
        classes = op.Range(op.Constant(value_int=0), op.Squeeze(n_cls), op.Constant(value_int=1))
        member = op.Equal(op.Unsqueeze(classes, op.Constant(value_ints=[1])),
                          op.Unsqueeze(inverse, op.Constant(value_ints=[0])))  # [C, N]
        per_class = op.Unsqueeze(op.Where(member, op.Unsqueeze(s, op.Constant(value_ints=[0])), neg_inf),
                                 op.Constant(value_ints=[0]))  # [1, C, N]
    n = op.Shape(b, start=0, end=1)
    selected = op.NonMaxSuppression(op.Unsqueeze(b, op.Constant(value_ints=[0])), per_class, n,
                                    op.Constant(value_floats=[float(iou_threshold)]),
                                    op.Constant(value_floats=[-_FLOAT_MAX]))  # score > -FLT_MAX: drops -inf
    keep = op.Reshape(op.Slice(selected, [2], [3], [1]), op.Constant(value_ints=[-1]))
    # The op's order: score descending, ties by lower index. TopK breaks ties by lower
    # position, so the kept indices are put in ascending order first.
    m = op.Shape(keep)
    keep, _ = op.TopK(keep, m, largest=0, sorted=1)
    _, order = op.TopK(op.Gather(s, keep, axis=0), m, largest=1, sorted=1)
    keep = op.Gather(keep, order, axis=0)
    if max_output is not None and max_output >= 0:
        keep = op.Slice(keep, [0], [int(max_output)], [0])
    return keep


def _const_f(op, v: float):
    return op.Constant(value_float=float(v))


def _tv_axis_weights(op, lo, hi, M: int, pad: int, n_pix: int):
    """[N, n_pix, M] bilinear weights of one axis in torchvision mode (csrc/paste_masks_common.h's
    tv_geometry / tv_tap, step by step in float32)."""
    import numpy as np

    P = M + 2 * pad
    scale = float(np.float32(P / M))
    half = op.Mul(op.Mul(op.Sub(hi, lo), _const_f(op, 0.5)), _const_f(op, scale))
    centre = op.Mul(op.Add(hi, lo), _const_f(op, 0.5))
    e0, e1 = op.Sub(centre, half), op.Add(centre, half)
    finite = op.Not(op.IsNaN(op.Mul(op.Add(e0, e1), _const_f(op, 0.0))))  # inf or NaN -> NaN
    lim = 4.0e15
    b0 = op.Cast(op.Clip(op.Where(finite, e0, _const_f(op, 0.0)), _const_f(op, -lim), _const_f(op, lim)), to=_INT64)
    b1 = op.Cast(op.Clip(op.Where(finite, e1, _const_f(op, 0.0)), _const_f(op, -lim), _const_f(op, lim)), to=_INT64)
    one = op.Constant(value_int=1)
    size = op.Max(op.Add(op.Sub(b1, b0), one), one)
    s = op.Div(_const_f(op, float(P)), op.Cast(size, to=_FLOAT))  # [N]
    pix = op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=n_pix), one),
                       op.Constant(value_ints=[0]))  # [1, n_pix]
    col = op.Constant(value_ints=[1])
    b0c, b1c, sc = op.Unsqueeze(b0, col), op.Unsqueeze(b1, col), op.Unsqueeze(s, col)
    inside = op.And(op.Unsqueeze(finite, col), op.And(op.GreaterOrEqual(pix, b0c), op.LessOrEqual(pix, b1c)))
    dst = op.Cast(op.Sub(pix, b0c), to=_FLOAT)
    src = op.Max(op.Sub(op.Mul(sc, op.Add(dst, _const_f(op, 0.5))), _const_f(op, 0.5)), _const_f(op, 0.0))
    i0 = op.Min(op.Cast(src, to=_INT64), op.Constant(value_int=P - 1))
    i1 = op.Add(i0, op.Cast(op.Less(i0, op.Constant(value_int=P - 1)), to=_INT64))
    l1 = op.Sub(src, op.Cast(i0, to=_FLOAT))
    return _axis_matrix(op, i0, i1, l1, inside, P, pad, M)


def _aligned_axis_weights(op, lo, hi, M: int, n_pix: int):
    """[N, n_pix, M] bilinear weights of one axis in aligned mode (aligned_geometry / aligned_tap)."""
    finite = op.Not(op.IsNaN(op.Mul(op.Add(lo, hi), _const_f(op, 0.0))))
    ok = op.And(finite, op.Greater(hi, lo))
    col = op.Constant(value_ints=[1])
    lo_c, hi_c = op.Unsqueeze(lo, col), op.Unsqueeze(hi, col)
    one = op.Constant(value_int=1)
    pix = op.Cast(op.Unsqueeze(op.Range(op.Constant(value_int=0), op.Constant(value_int=n_pix), one),
                               op.Constant(value_ints=[0])), to=_FLOAT)
    g = op.Sub(op.Mul(op.Div(op.Sub(op.Add(pix, _const_f(op, 0.5)), lo_c), op.Sub(hi_c, lo_c)), _const_f(op, 2.0)),
               _const_f(op, 1.0))
    coord = op.Div(op.Sub(op.Mul(op.Add(g, _const_f(op, 1.0)), _const_f(op, float(M))), _const_f(op, 1.0)),
                   _const_f(op, 2.0))
    f = op.Floor(coord)
    valid = op.And(op.Unsqueeze(ok, col),
                   op.And(op.GreaterOrEqual(f, _const_f(op, -1.0)), op.LessOrEqual(f, _const_f(op, float(M)))))
    f = op.Where(valid, f, _const_f(op, 0.0))
    i0 = op.Cast(f, to=_INT64)
    l1 = op.Where(valid, op.Sub(coord, f), _const_f(op, 0.0))
    return _axis_matrix(op, i0, op.Add(i0, one), l1, valid, M, 0, M)


def _axis_matrix(op, i0, i1, l1, inside, P: int, pad: int, M: int):
    """Dense [N, n_pix, M] weights: (1 - l1) at tap i0, l1 at tap i1 (indices into the padded
    axis of P cells, of which [pad, pad + M) are the mask), zero where not ``inside``."""
    q = op.Reshape(op.Range(op.Constant(value_int=0), op.Constant(value_int=P), op.Constant(value_int=1)),
                   op.Constant(value_ints=[1, 1, P]))
    last = op.Constant(value_ints=[2])
    w0 = op.Mul(op.Cast(op.Equal(op.Unsqueeze(i0, last), q), to=_FLOAT),
                op.Unsqueeze(op.Sub(_const_f(op, 1.0), l1), last))
    w1 = op.Mul(op.Cast(op.Equal(op.Unsqueeze(i1, last), q), to=_FLOAT), op.Unsqueeze(l1, last))
    w = op.Mul(op.Add(w0, w1), op.Cast(op.Unsqueeze(inside, last), to=_FLOAT))
    return op.Slice(w, [pad], [pad + M], [2]) if pad else w


def paste_masks_to_onnx(masks, boxes, image_height, image_width, padding, threshold, aligned):
    """Each canvas is Wy @ mask @ Wx^T, with the bilinear weights of the kernels' geometry
    (dense [N, H, M] and [N, W, M] matrices): MatMuls instead of a loop over masks."""
    import numpy as np

    op = _op()
    M = masks.shape[1]
    if not isinstance(M, int):
        raise ValueError("instseg::paste_masks to ONNX: the mask size M must be static")
    m = op.Cast(masks, to=_FLOAT)
    b = op.Cast(boxes, to=_FLOAT)
    x0, y0, x1, y1 = (op.Squeeze(op.Slice(b, [i], [i + 1], [1]), [1]) for i in range(4))
    # A box with a non-finite coordinate pastes nothing (either axis' weights are zero).
    if aligned:
        wy = _aligned_axis_weights(op, y0, y1, M, int(image_height))
        wx = _aligned_axis_weights(op, x0, x1, M, int(image_width))
    else:
        wy = _tv_axis_weights(op, y0, y1, M, int(padding), int(image_height))
        wx = _tv_axis_weights(op, x0, x1, M, int(padding), int(image_width))
    finite_box = op.Not(op.IsNaN(op.ReduceSum(op.Mul(b, _const_f(op, 0.0)), op.Constant(value_ints=[1]),
                                              keepdims=0)))
    wy = op.Mul(wy, op.Cast(op.Reshape(finite_box, op.Constant(value_ints=[-1, 1, 1])), to=_FLOAT))
    out = op.MatMul(op.MatMul(wy, m), op.Transpose(wx, perm=[0, 2, 1]))  # [N, H, W]
    if threshold is not None:
        return op.GreaterOrEqual(out, _const_f(op, float(np.float32(threshold))))
    return op.CastLike(out, masks)


def translation_table() -> Dict[Callable, Callable]:
    """``custom_translation_table`` for ``torch.onnx.export(..., dynamo=True)``: the instseg
    ops that have an ONNX translation."""
    return {
        torch.ops.instseg.roi_align.default: roi_align_to_onnx,
        torch.ops.instseg.multilevel_roi_align.default: multilevel_roi_align_to_onnx,
        torch.ops.instseg.nms.default: nms_to_onnx,
        torch.ops.instseg.paste_masks.default: paste_masks_to_onnx,
    }


def export(model, args=(), f=None, *, custom_translation_table: Optional[Dict[Callable, Callable]] = None,
           **kwargs):
    """``torch.onnx.export(model, args, f, dynamo=True, ...)`` with :func:`translation_table`
    merged into ``custom_translation_table`` (entries given here win). Returns the ONNXProgram."""
    table = translation_table()
    table.update(custom_translation_table or {})
    kwargs.setdefault("dynamo", True)
    if not kwargs["dynamo"]:
        raise ValueError("instseg_ops.onnx.export: only the torch.export-based exporter (dynamo=True) is supported")
    return torch.onnx.export(model, args, f, custom_translation_table=table, **kwargs)


_registered = False


def register() -> bool:
    """Adds the translations to onnxscript's torchlib registry, which
    ``torch.onnx.export(..., dynamo=True)`` reads on every export, so that a plain export
    (without ``custom_translation_table``) translates the instseg ops too. Called when this
    module is imported; returns False when onnxscript is not installed or its registry API
    is not the one this was written against (then pass :func:`translation_table` instead)."""
    global _registered
    if _registered:
        return True
    try:
        from onnxscript.function_libs.torch_lib.registration import torch_op
    except ImportError:
        return False
    for name, fn in (("instseg::roi_align", roi_align_to_onnx),
                     ("instseg::multilevel_roi_align", multilevel_roi_align_to_onnx),
                     ("instseg::nms", nms_to_onnx),
                     ("instseg::paste_masks", paste_masks_to_onnx)):
        torch_op(name, trace_only=True)(fn)
    _registered = True
    return True


register()


# ---------------------------------------------------------------------------
# The TorchScript-based exporter (torch.onnx.export(..., dynamo=False)), as torchvision
# registers its ops for it: roi_align and nms, opset 16 and newer (RoiAlign's
# coordinate_transformation_mode needs 16). Same graphs as above, written with g.op.

_LEGACY_OPSET = 16


def _legacy_const(g, value, dtype):
    return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))


def _legacy_roi_align(g, input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                      deterministic=None):
    from torch.onnx.symbolic_helper import _maybe_get_const

    st = input.type().scalarType() if input.type().kind() == "TensorType" else None
    dt = _DOUBLE if st == "Double" else _FLOAT
    x = input if st in ("Float", "Double") else g.op("Cast", input, to_i=dt)
    i0, i1, i5 = (_legacy_const(g, [v], torch.long) for v in (0, 1, 5))
    batch = g.op("Cast", g.op("Squeeze", g.op("Slice", rois, i0, i1, i1), i1), to_i=_INT64)
    coords = g.op("Cast", g.op("Slice", rois, i1, i5, i1), to_i=dt)
    out = g.op("RoiAlign", x, coords, batch,
               coordinate_transformation_mode_s="half_pixel" if _maybe_get_const(aligned, "b") else
               "output_half_pixel", mode_s="avg", output_height_i=_maybe_get_const(pooled_height, "i"),
               output_width_i=_maybe_get_const(pooled_width, "i"),
               sampling_ratio_i=max(int(_maybe_get_const(sampling_ratio, "i")), 0),
               spatial_scale_f=_maybe_get_const(spatial_scale, "f"))
    return out if st in ("Float", "Double") else g.op("CastLike", out, input)


def _legacy_nms(g, boxes, scores, idxs, iou_threshold, max_output=None, score_threshold=None):
    from torch.onnx.symbolic_helper import _is_none, _maybe_get_const

    b = g.op("Cast", boxes, to_i=_FLOAT)
    s = g.op("Cast", scores, to_i=_FLOAT)
    # x * 0 is NaN for inf and NaN; the MatMul with ones sums the four coordinates.
    coords_nan = g.op("IsNaN", g.op("MatMul", g.op("Mul", b, _legacy_const(g, 0.0, torch.float)),
                                    _legacy_const(g, [1.0, 1.0, 1.0, 1.0], torch.float)))
    bad = g.op("Or", coords_nan, g.op("IsNaN", s))
    if score_threshold is not None and not _is_none(score_threshold):
        thr = float(_maybe_get_const(score_threshold, "f"))
        bad = g.op("Or", bad, g.op("Less", g.op("Cast", scores, to_i=_DOUBLE),
                                   _legacy_const(g, thr, torch.float64)))
    neg_inf = _legacy_const(g, float("-inf"), torch.float)
    s = g.op("Where", bad, neg_inf, s)
    ax0, ax1 = _legacy_const(g, [0], torch.long), _legacy_const(g, [1], torch.long)
    if idxs is None or _is_none(idxs):
        per_class = g.op("Unsqueeze", s, _legacy_const(g, [0, 1], torch.long))
    else:
        classes, _, inverse, _ = g.op("Unique", g.op("Cast", idxs, to_i=_INT64), sorted_i=1, outputs=4)
        n_cls = g.op("Squeeze", g.op("Shape", classes), ax0)
        rng = g.op("Range", _legacy_const(g, 0, torch.long), n_cls, _legacy_const(g, 1, torch.long))
        member = g.op("Equal", g.op("Unsqueeze", rng, ax1), g.op("Unsqueeze", inverse, ax0))
        per_class = g.op("Unsqueeze", g.op("Where", member, g.op("Unsqueeze", s, ax0), neg_inf), ax0)
    n = g.op("Slice", g.op("Shape", b), ax0, ax1, ax0)
    selected = g.op("NonMaxSuppression", g.op("Unsqueeze", b, ax0), per_class, n,
                    _legacy_const(g, [float(_maybe_get_const(iou_threshold, "f"))], torch.float),
                    _legacy_const(g, [-_FLOAT_MAX], torch.float))
    keep = g.op("Reshape", g.op("Slice", selected, _legacy_const(g, [2], torch.long),
                                _legacy_const(g, [3], torch.long), ax1), _legacy_const(g, [-1], torch.long))
    m = g.op("Shape", keep)
    keep, _ = g.op("TopK", keep, m, largest_i=0, sorted_i=1, outputs=2)
    _, order = g.op("TopK", g.op("Gather", s, keep, axis_i=0), m, largest_i=1, sorted_i=1, outputs=2)
    keep = g.op("Gather", keep, order, axis_i=0)
    limit = -1 if max_output is None or _is_none(max_output) else int(_maybe_get_const(max_output, "i"))
    if limit >= 0:
        keep = g.op("Slice", keep, ax0, _legacy_const(g, [limit], torch.long), ax0)
    return keep


_legacy_registered = False


def register_legacy() -> bool:
    """Registers roi_align and nms for ``torch.onnx.export(..., dynamo=False)`` (opset >= 16).
    Called on import; False when this torch has no TorchScript-based exporter."""
    global _legacy_registered
    if _legacy_registered:
        return True
    try:
        torch.onnx.register_custom_op_symbolic("instseg::roi_align", _legacy_roi_align, _LEGACY_OPSET)
        torch.onnx.register_custom_op_symbolic("instseg::nms", _legacy_nms, _LEGACY_OPSET)
    except (AttributeError, ImportError, RuntimeError):
        return False
    _legacy_registered = True
    return True


register_legacy()
