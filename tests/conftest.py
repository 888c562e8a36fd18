"""Shared test setup: CPU-only, deterministic, quiet DeepSpeed."""
from __future__ import annotations

import os

# Before anything imports deepspeed: pick the CPU accelerator explicitly (no detection warning).
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """Tiny models: a second intra-op thread only adds spinning on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
