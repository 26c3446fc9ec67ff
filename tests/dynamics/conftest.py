"""Shared settings for the learning-dynamics tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread() -> None:
    # The simulated matrices are small; one thread avoids oversubscription on shared CPUs.
    torch.set_num_threads(1)
