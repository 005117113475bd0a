"""Random inputs for the RoIAlign tests."""
import torch


def random_rois(k, n_img, height, width, scale=1.0, dtype=torch.float32, device="cpu", malformed=False,
                margin=0.25, generator=None):
    """Tensor[k, 5] of boxes in image coordinates (feature size / scale).

    Boxes may stick out of the image by `margin` of its size; `malformed` allows
    x2 < x1 or y2 < y1 and degenerate (zero-size) boxes.
    """
    img_h, img_w = height / scale, width / scale
    lo = torch.tensor([-margin * img_w, -margin * img_h], dtype=torch.float64)
    span = torch.tensor([(1 + 2 * margin) * img_w, (1 + 2 * margin) * img_h], dtype=torch.float64)
    p1 = lo + torch.rand(k, 2, dtype=torch.float64, generator=generator) * span
    size = torch.rand(k, 2, dtype=torch.float64, generator=generator) * span * 0.6
    if malformed:
        size = size * torch.where(torch.rand(k, 2, generator=generator) < 0.2, -1.0, 1.0).double()
        size[torch.rand(k, generator=generator) < 0.1] = 0.0
    p2 = p1 + size
    idx = torch.randint(0, max(n_img, 1), (k, 1), generator=generator).double()
    return torch.cat([idx, p1, p2], dim=1).to(dtype=dtype, device=device)


def as_layout(x, layout):
    return x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x.contiguous()
