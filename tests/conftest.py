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


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (the machine is shared: no oversubscription, and
    deterministic reductions); modules that train use it for every test through
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Kept importable from here for the older test modules; new ones import from _helpers.
from _helpers import cuda_available, requires_cuda  # noqa: E402,F401
