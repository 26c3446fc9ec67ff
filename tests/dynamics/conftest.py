"""Shared settings for the learning-dynamics tests."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _single_thread() -> Iterator[None]:
    # The simulated matrices are small; one thread avoids oversubscription on shared CPUs
    # (two contending threads were ~30x slower here). Module scope, so that the module-scoped
    # simulation fixtures run single-threaded too; restored afterwards for other test folders.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
