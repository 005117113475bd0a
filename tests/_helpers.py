"""Helpers shared by the tests (import them from here, not from conftest)."""
import pytest
import torch

import instseg_ops


def cuda_available() -> bool:
    return torch.cuda.is_available() and instseg_ops.cuda_built()


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device and a CUDA build")


def cpu_and_cuda():
    """The devices to parametrize over: "cpu", and "cuda" as a parameter skipped without a GPU."""
    return ["cpu", pytest.param("cuda", marks=requires_cuda)]
