"""Recommender tests train tiny models: one intra-op thread is as fast as two for them, and on
shared cores OpenMP threads spin-waiting on each other made them ~10x slower."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
