"""Non-maximum suppression: ``nms`` and class-aware ``batched_nms``.

Drop-ins for ``torchvision.ops.nms`` / ``batched_nms`` with the same kept indices,
a stable order (ties in score break by lower index), per-category NMS without
the coordinate-offset trick, and optional ``max_output`` / ``score_threshold``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.overrides import handle_torch_function, has_torch_function_variadic


def nms(boxes: Tensor, scores: Tensor, iou_threshold: float, max_output: Optional[int] = None,
        score_threshold: Optional[float] = None) -> Tensor:
    """Greedy NMS. Returns int64 indices of the kept boxes, by decreasing score (ties: lower index first).

    A box is suppressed when its IoU with a kept, higher-ranked box is strictly greater than
    ``iou_threshold``. Boxes are (x1, y1, x2, y2), areas ``(x2 - x1) * (y2 - y1)``; IoU is computed
    in float32 (float64 for float64 boxes) and compared with ``iou_threshold`` as a float64 number,
    as torchvision's CPU kernel does (a float32 IoU of 0.30000001 suppresses at 0.3). Boxes with a
    score below ``score_threshold`` (also compared exactly), a NaN score or a non-finite
    coordinate are never kept; scores of +-inf are ordinary (first and last), as in torchvision.

    Scriptable (``torch.jit.script``), and a leaf of ``torch.fx.symbolic_trace``.
    """
    if has_torch_function_variadic(boxes, scores):
        return handle_torch_function(_ORIGINAL["nms"], (boxes, scores), boxes, scores, iou_threshold, max_output,
                                     score_threshold)
    return torch.ops.instseg.nms(boxes, scores, None, float(iou_threshold),
                                 -1 if max_output is None else int(max_output),
                                 None if score_threshold is None else float(score_threshold))


def batched_nms(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float, max_output: Optional[int] = None,
                score_threshold: Optional[float] = None) -> Tensor:
    """NMS independently per category ``idxs`` (integer Tensor[N]); same ordering rule as :func:`nms`.

    Boxes of different categories never interact (no coordinate offsets: torchvision offsets the
    boxes of small inputs by category, which rounds their coordinates, so at IoUs within float32
    rounding of the threshold its answer can differ). ``max_output`` limits the merged result.
    Boolean ``idxs`` are taken as 0/1 and floating ones by their distinct values, as torchvision
    accepts them. Empty ``boxes`` give an empty int64 tensor, also with ``None`` scores and
    ``idxs``, as in torchvision.

    Scriptable (``torch.jit.script``), and a leaf of ``torch.fx.symbolic_trace``.
    """
    if has_torch_function_variadic(boxes, scores, idxs):
        return handle_torch_function(_ORIGINAL["batched_nms"], (boxes, scores, idxs), boxes, scores, idxs,
                                     iou_threshold, max_output, score_threshold)
    if scores is None or idxs is None:
        # torchvision returns an empty result for empty boxes before looking at the rest.
        # (Not tested for tensors: boxes.numel() would be a data-dependent guard under compile.)
        if boxes.numel() == 0:
            return torch.empty((0,), dtype=torch.int64, device=boxes.device)
        raise ValueError("batched_nms: scores and idxs must be tensors (None only with empty boxes)")
    if idxs.dtype == torch.bool:
        idxs = idxs.long()
    elif idxs.is_floating_point():
        idxs = torch.unique(idxs, return_inverse=True)[1]
    return torch.ops.instseg.nms(boxes, scores, idxs, float(iou_threshold),
                                 -1 if max_output is None else int(max_output),
                                 None if score_threshold is None else float(score_threshold))


torch.fx.wrap("nms")
torch.fx.wrap("batched_nms")
torch.fx.wrap("soft_nms")


@torch.library.register_fake("instseg::nms")
def _nms_fake(boxes, scores, idxs, iou_threshold, max_output=-1, score_threshold=None):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "nms: boxes must be a Tensor[N, 4]")
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0], lambda: "nms: scores must be a Tensor[N]")
    ctx = torch.library.get_ctx()
    n = ctx.new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64)


SOFT_NMS_METHODS = {"linear": 0, "gaussian": 1}


def soft_nms(boxes: Tensor, scores: Tensor, iou_threshold: float = 0.3, sigma: float = 0.5,
             score_threshold: float = 0.001, method: str = "linear") -> Tuple[Tensor, Tensor]:
    """Soft-NMS (Bodla et al., 2017). Returns ``(keep, kept_scores)``.

    Repeatedly keeps the remaining box with the highest current score (ties: lower index)
    and decays the scores of the others by their IoU with it: ``"linear"`` multiplies by
    ``1 - IoU`` when ``IoU > iou_threshold``; ``"gaussian"`` by ``exp(-IoU**2 / sigma)``.
    Boxes whose score is or falls below ``score_threshold`` are dropped, as are boxes with
    a non-finite score or coordinate. ``keep`` (int64) is in selection order, which is by
    decreasing decayed score; ``kept_scores`` are those decayed scores (scores' dtype).
    Scriptable, and a leaf of ``torch.fx.symbolic_trace``.
    """
    if has_torch_function_variadic(boxes, scores):
        return handle_torch_function(_ORIGINAL["soft_nms"], (boxes, scores), boxes, scores, iou_threshold, sigma,
                                     score_threshold, method)
    if method == "linear":
        code = 0
    elif method == "gaussian":
        code = 1
    else:
        raise ValueError(f"soft_nms: method must be 'linear' or 'gaussian', got '{method}'")
    return torch.ops.instseg.soft_nms(boxes, scores, float(iou_threshold), float(sigma), float(score_threshold), code)


@torch.library.register_fake("instseg::soft_nms")
def _soft_nms_fake(boxes, scores, iou_threshold, sigma, score_threshold, method):
    torch._check(boxes.dim() == 2 and boxes.shape[1] == 4, lambda: "soft_nms: boxes must be a Tensor[N, 4]")
    torch._check(scores.dim() == 1 and scores.shape[0] == boxes.shape[0],
                 lambda: "soft_nms: scores must be a Tensor[N]")
    n = torch.library.get_ctx().new_dynamic_size()
    return boxes.new_empty((n,), dtype=torch.int64), scores.new_empty((n,))


def _soft_nms_backward(ctx, *grads):
    raise RuntimeError("instseg::soft_nms is not differentiable (no backward is implemented): detach the "
                       "scores, or take the kept scores by indexing the input scores with keep")


def _no_context(ctx, inputs, output):
    pass


torch.library.register_autograd("instseg::soft_nms", _soft_nms_backward, setup_context=_no_context)

# The functions themselves, for FX nodes (torch.fx.wrap patches this module's globals while
# tracing, and a node whose target were that patch could not be scripted).
_ORIGINAL = {"nms": nms, "batched_nms": batched_nms, "soft_nms": soft_nms}
