import os

import pytest
import torch

import instseg_ops  # noqa: F401  (registers the ops)


@pytest.fixture
def seed():
    """A fresh seed per test; printed so that a failure can be replayed."""
    s = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(s)
    print(f"seed = {s}")
    return s


def cuda_available():
    return torch.cuda.is_available() and instseg_ops.cuda_built()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and a CUDA build")
