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
