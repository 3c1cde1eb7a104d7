"""Shared pytest fixtures."""
from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for the test, restored afterwards. For modules of tiny tensors
    (``pytestmark = pytest.mark.usefixtures("one_thread")``): OpenMP's fork/join per op
    dominates them and, on a loaded 2-core box, makes them several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
