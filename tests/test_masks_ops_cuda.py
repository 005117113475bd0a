"""The binary-mask ops' CUDA kernels on a real GPU against the CPU kernels (skipped without
one; the same kernels run on the CPU through the emulation in test_cuda_emulated.py)."""
import pytest
import torch

import instseg_ops
from conftest import requires_cuda
from test_masks_ops import random_masks

pytestmark = [pytest.mark.cuda, requires_cuda]


@pytest.mark.parametrize("shape", [(6, 37, 53), (3, 1, 300), (2, 300, 1), (4, 512, 512), (0, 5, 5), (3, 0, 4)])
def test_mask_ops_cuda_match_cpu(seed, shape):
    gen = torch.Generator().manual_seed(seed)
    masks = random_masks(gen, *shape)
    gpu = masks.cuda()
    for m, g in ((masks.bool(), gpu.bool()), (masks, gpu)):
        assert torch.equal(torch.ops.instseg.masks_to_boxes(g).cpu(), torch.ops.instseg.masks_to_boxes(m))
        counts, offsets = torch.ops.instseg.masks_to_rle(g)
        want_counts, want_offsets = torch.ops.instseg.masks_to_rle(m)
        assert counts.is_cuda and torch.equal(counts.cpu(), want_counts) and torch.equal(offsets.cpu(), want_offsets)
        for c in (4, 8):
            labels, areas = instseg_ops.connected_components(g, c)
            want_labels, want_areas = instseg_ops.connected_components(m, c)
            assert torch.equal(labels.cpu(), want_labels) and torch.equal(areas.cpu(), want_areas)
    assert instseg_ops.masks_to_rle(gpu) == instseg_ops.masks_to_rle(masks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_stability_score_and_boxes_cuda_match_cpu(seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(5, 64, 97, generator=gen) * 3).to(dtype)
    logits[1] = torch.randint(-3, 4, (64, 97), generator=gen).to(dtype)
    for thr, off in [(0.0, 1.0), (0.3, 0.7)]:
        s, b = instseg_ops.stability_score_and_boxes(logits.cuda(), thr, off)
        ws, wb = instseg_ops.stability_score_and_boxes(logits, thr, off)
        torch.testing.assert_close(s.cpu(), ws, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(b.cpu(), wb)
