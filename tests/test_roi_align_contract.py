"""RoIAlign under the shared op contract (tests/op_contract.py): the same dtype x layout x
device x reference x gradient x opcheck matrix as every op that adopts it. The op-specific
tests stay in test_roi_align.py."""
import torch

from instseg_ops import roi_align
from instseg_ops.reference import roi_align_reference
from op_contract import OpContract, pytest_generate_tests  # noqa: F401  (parametrizes the contract)
from roi_utils import as_layout, random_rois

OUTPUT, SCALE, SAMPLING = (3, 2), 0.5, 2


class TestRoIAlignContract(OpContract):
    layouts = ("nchw", "channels_last")
    differentiable = (0,)

    def sample(self, dtype, layout, device, gen):
        x = torch.randn(2, 3, 9, 11, generator=gen, dtype=torch.float64).to(dtype)
        rois = random_rois(7, 2, 9, 11, scale=SCALE, dtype=torch.float32 if dtype != torch.float64 else dtype,
                           malformed=True, generator=gen)
        return as_layout(x, layout).to(device), rois.to(device)

    def gradcheck_sample(self, layout, device, gen):
        x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64)
        rois = random_rois(4, 2, 5, 6, scale=SCALE, dtype=torch.float64, generator=gen)
        return as_layout(x, layout).to(device), rois.to(device)

    def run(self, x, rois, **kw):
        return roi_align(x, rois, OUTPUT, SCALE, SAMPLING, True, **kw)

    def reference(self, x, rois):
        # Geometry in float32 for reduced-precision inputs, as the kernels compute it.
        return roi_align_reference(x, rois, OUTPUT, SCALE, SAMPLING, True)

    def tolerance(self, dtype):
        return {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]

    def op_calls(self, x, rois):
        grad = torch.randn(rois.shape[0], x.shape[1], *OUTPUT, dtype=x.dtype, device=x.device)
        cl = not x.is_contiguous()
        return [(torch.ops.instseg.roi_align.default,
                 (x.detach().requires_grad_(), rois, SCALE, *OUTPUT, SAMPLING, True, False)),
                (torch.ops.instseg._roi_align_backward.default,
                 (grad, rois, SCALE, *OUTPUT, *x.shape, SAMPLING, True, cl, False))]
