"""RoIAlign: Python API, fake kernels and autograd for ``instseg::roi_align``.

``roi_align`` is a drop-in replacement for ``torchvision.ops.roi_align`` (same
arguments, same numbers) that also takes float16/bfloat16 natively, keeps
channels_last inputs in place, never reads out of bounds on bad boxes and has a
deterministic CUDA backward.
"""
from typing import List, Optional, Tuple, Union

import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2
from torch.overrides import handle_torch_function, has_torch_function_variadic

# What TorchScript understands; in Python any sequence of tensors is taken.
BoxesArg = Union[Tensor, List[Tensor]]


def _pair(output_size: BroadcastingList2[int]) -> Tuple[int, int]:
    # Under TorchScript output_size is already a List[int] (an int is broadcast to two).
    if isinstance(output_size, int):
        return output_size, output_size
    if not torch.jit.is_scripting():
        _check_output_size(output_size)
    if len(output_size) == 1:
        return int(output_size[0]), int(output_size[0])
    if len(output_size) != 2:
        raise ValueError("roi_align: output_size must be an int or a pair of ints")
    return int(output_size[0]), int(output_size[1])


@torch.jit.unused
def _check_output_size(output_size) -> None:
    if not isinstance(output_size, (list, tuple)) or len(output_size) not in (1, 2):
        raise ValueError(f"roi_align: output_size must be an int or a pair of ints, got {output_size!r}")


@torch.jit.unused
def _check_boxes_type(boxes) -> None:
    if not isinstance(boxes, (list, tuple)):
        raise TypeError(f"roi_align: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got {type(boxes)}")
    for i, b in enumerate(boxes):
        if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"roi_align: boxes[{i}] must be a Tensor[L, 4], got {getattr(b, 'shape', type(b))}")


def boxes_to_rois(boxes: BoxesArg, like: Tensor) -> Tensor:
    """Tensor[K, 5] (batch index, x1, y1, x2, y2) from either that or a list of Tensor[L, 4]."""
    if isinstance(boxes, Tensor):
        if boxes.dim() != 2 or boxes.shape[1] != 5:
            raise ValueError(
                f"roi_align: boxes must be a Tensor[K, 5] or a list of Tensor[L, 4], got shape {boxes.shape}")
        return boxes
    if not torch.jit.is_scripting():
        _check_boxes_type(boxes)
    if len(boxes) == 0:
        return like.new_zeros((0, 5))
    parts: List[Tensor] = []
    for i, b in enumerate(boxes):
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"roi_align: boxes[{i}] must be a Tensor[L, 4], got shape {b.shape}")
        # At least float32: float16 (bfloat16) cannot hold batch indices above 2048 (256).
        dt = torch.promote_types(b.dtype, torch.float32) if b.is_floating_point() else b.dtype
        parts.append(torch.cat([torch.full((b.shape[0], 1), float(i), dtype=dt, device=b.device), b.to(dt)], dim=1))
    return torch.cat(parts, dim=0)


def _deterministic(deterministic: Optional[bool]) -> bool:
    """``deterministic``, or torch's global flag when None (in TorchScript, which cannot read
    that flag, None is False)."""
    if deterministic is not None:
        return deterministic
    if torch.jit.is_scripting():
        return False
    return torch.are_deterministic_algorithms_enabled()


def _sampling_ratio(v: int) -> int:
    """``int(v)``, refusing values that are not whole numbers (2.5 must not become 2)."""
    if int(v) != v:
        raise ValueError(f"roi_align: sampling_ratio must be an integer, got {v}")
    return int(v)


def is_channels_last(t: Tensor) -> bool:
    """The layout rule the kernels use: channels_last only when not also plain contiguous."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def roi_align(
    input: Tensor,
    boxes: BoxesArg,
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    deterministic: Optional[bool] = None,
) -> Tensor:
    """RoIAlign (He et al., Mask R-CNN), same semantics as ``torchvision.ops.roi_align``.

    Args:
        input: Tensor[N, C, H, W], float32/float64/float16/bfloat16, NCHW or channels_last.
            A quantized (quint8/qint8/qint32, per-tensor) CPU map is pooled as torchvision's
            is: dequantized, pooled in float32, quantized again with the map's scale and
            zero point (boxes may be float or quantized).
        boxes: Tensor[K, 5] (batch index, x1, y1, x2, y2) or a list of Tensor[L, 4]
            (one per image). Any floating dtype; coordinates are used in float32
            (float64 for float64 input).
        output_size: int or (height, width) of each pooled RoI.
        spatial_scale: factor mapping box coordinates to input coordinates.
        sampling_ratio: samples per bin along each axis; <= 0 means adaptive
            (``ceil(roi_size / output_size)``).
        aligned: shift boxes by -0.5 pixel (pixel-centre model), no minimum RoI size.
        deterministic: use the deterministic CUDA backward. ``None`` follows
            ``torch.are_deterministic_algorithms_enabled()`` (False in TorchScript, which
            cannot read that flag). CPU is always deterministic.

    Returns:
        Tensor[K, C, output_size[0], output_size[1]] with the input's dtype and memory format.

    Scriptable (``torch.jit.script``), and a leaf of ``torch.fx.symbolic_trace`` wherever it
    is called from.
    """
    if has_torch_function_variadic(input, boxes):
        # torch.fx proxies (and other tensor-likes) record this call as one node.
        return handle_torch_function(_ORIGINAL["roi_align"], (input, boxes), input, boxes, output_size, spatial_scale,
                                     sampling_ratio, aligned, deterministic)
    rois = boxes_to_rois(boxes, input)
    ph, pw = _pair(output_size)
    return torch.ops.instseg.roi_align(input, rois, float(spatial_scale), ph, pw, _sampling_ratio(sampling_ratio),
                                       bool(aligned), _deterministic(deterministic))


torch.fx.wrap("roi_align")


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (drop-in for ``torchvision.ops.RoIAlign``); scriptable."""

    def __init__(self, output_size: BroadcastingList2[int], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False, deterministic: Optional[bool] = None):
        super().__init__()
        self.output_size = output_size
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.deterministic = deterministic

    def forward(self, input: Tensor, rois: BoxesArg) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                         self.deterministic)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


# ---------------------------------------------------------------------------
# Fake kernels: shapes, dtypes and memory formats, no data.


def _memory_format(channels_last: bool):
    return torch.channels_last if channels_last else torch.contiguous_format


@torch.library.register_fake("instseg::roi_align")
def _roi_align_fake(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                    deterministic=False):
    torch._check(input.dim() == 4, lambda: "roi_align: input must be a 4-D tensor [N, C, H, W]")
    torch._check(rois.dim() == 2 and rois.shape[1] == 5, lambda: "roi_align: rois must be a Tensor[K, 5]")
    torch._check(pooled_height > 0 and pooled_width > 0, lambda: "roi_align: output_size must be positive")
    torch._check(input.device == rois.device, lambda: f"roi_align: input is on {input.device} but rois are on {rois.device}")
    return torch.empty((rois.shape[0], input.shape[1], pooled_height, pooled_width), dtype=input.dtype,
                       device=input.device, memory_format=_memory_format(is_channels_last(input)))


@torch.library.register_fake("instseg::_roi_align_backward")
def _roi_align_backward_fake(grad, rois, spatial_scale, pooled_height, pooled_width, batch_size, channels,
                             height, width, sampling_ratio, aligned, channels_last, deterministic):
    torch._check(grad.dim() == 4, lambda: "_roi_align_backward: grad must be 4-D")
    return torch.empty((batch_size, channels, height, width), dtype=grad.dtype, device=grad.device,
                       memory_format=_memory_format(channels_last))


# ---------------------------------------------------------------------------
# Autograd. The backward is its own op; its derivative (double backward) is the
# forward again, since RoIAlign is linear in its input.


def _setup_context(ctx, inputs, output):
    input, rois, spatial_scale, ph, pw, sampling_ratio, aligned, deterministic = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned, deterministic)
    ctx.input_shape = input.shape
    ctx.channels_last = is_channels_last(input)


def _backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned, deterministic = ctx.args
    n, c, h, w = ctx.input_shape
    grad_input = torch.ops.instseg._roi_align_backward(
        grad, rois, spatial_scale, ph, pw, n, c, h, w, sampling_ratio, aligned, ctx.channels_last, deterministic)
    return grad_input, None, None, None, None, None, None, None


torch.library.register_autograd("instseg::roi_align", _backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    grad, rois, spatial_scale, ph, pw, _n, _c, _h, _w, sampling_ratio, aligned, _cl, deterministic = inputs
    ctx.save_for_backward(rois)
    ctx.args = (spatial_scale, ph, pw, sampling_ratio, aligned, deterministic)


def _backward_backward(ctx, grad_grad_input):
    (rois,) = ctx.saved_tensors
    spatial_scale, ph, pw, sampling_ratio, aligned, deterministic = ctx.args
    grad_grad = torch.ops.instseg.roi_align(grad_grad_input, rois, spatial_scale, ph, pw, sampling_ratio, aligned,
                                            deterministic)
    return (grad_grad,) + (None,) * 12


torch.library.register_autograd("instseg::_roi_align_backward", _backward_backward,
                                setup_context=_backward_setup_context)


# ---------------------------------------------------------------------------
# Quantized maps (CPU), as torchvision's CPU kernel takes them: dequantize, pool in
# float32, quantize with the map's scale and zero point. Registered for the
# QuantizedCPU key, so the float path pays nothing for it.


def _roi_align_quantized(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned,
                         deterministic=False):
    if input.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise NotImplementedError(f"roi_align: quantized maps must be quantized per tensor, got {input.qscheme()}")
    rois = rois.dequantize() if rois.is_quantized else rois
    out = torch.ops.instseg.roi_align(input.dequantize(), rois, spatial_scale, pooled_height, pooled_width,
                                      sampling_ratio, aligned, deterministic)
    return torch.quantize_per_tensor(out, input.q_scale(), input.q_zero_point(), input.dtype)


torch.library.impl("instseg::roi_align", "QuantizedCPU")(_roi_align_quantized)

# The functions themselves, for FX nodes (torch.fx.wrap patches this module's globals while
# tracing, and a node whose target were that patch could not be scripted).
_ORIGINAL = {"roi_align": roi_align}
