"""Decoding batches in DataLoader worker processes, in a fixed order.

The main process streams raw samples (:func:`qkdissect.mining.readers.plan_batches`: file paths or encoded
bytes) and hands each batch to a worker, which decodes and preprocesses it; the DataLoader returns the batches
in the order they were planned, whatever the number of workers. A decoded batch is a dict::

    unit      int                     the unit the batch belongs to
    last      bool                    the unit ends with this batch
    index     (n_good,) int64         packed ids of the decoded images: unit·2³² + position
    pixels    (n_good, 3, H, W) float32 or None
    samples   [(position, id, reason or None)] every sample of the batch, bad ones included

On CUDA the DataLoader pins the pixel tensors so that the copy to the GPU does not block.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from qkdissect.errors import QKDissectError
from qkdissect.mining.readers import Batch, plan_batches
from qkdissect.mining.sources import ImageSource

__all__ = ["UNIT_SHIFT", "batch_loader", "pack", "unpack"]

UNIT_SHIFT = 32  # packed image id = unit << 32 | position


def pack(unit: int, position: int) -> int:
    return (int(unit) << UNIT_SHIFT) | int(position)


def unpack(packed: int) -> tuple[int, int]:
    return int(packed) >> UNIT_SHIFT, int(packed) & ((1 << UNIT_SHIFT) - 1)


class _Decoder(torch.utils.data.Dataset):
    """Turns one planned :class:`Batch` into a decoded batch (see the module docstring); never raises for a bad
    sample: its reason is recorded instead."""

    def __init__(self, preprocessing):
        self.preprocessing = preprocessing

    def __len__(self) -> int:  # batches come from the plan, not from indices
        return 0

    def __getitem__(self, index):
        raise TypeError("batches are decoded whole (__getitems__)")

    def __getitems__(self, batch: Batch) -> dict[str, Any]:
        from qkdissect.images import open_image

        good, pixels, samples = [], [], []
        for sample in batch.samples:
            reason = sample.reason
            if reason is None:
                try:
                    if isinstance(sample.payload, Path):
                        image = open_image(sample.payload)
                    else:
                        image = open_image(sample.payload, name=sample.id)
                    pixels.append(self.preprocessing(image))
                    good.append((batch.unit << UNIT_SHIFT) | sample.position)
                except QKDissectError as error:
                    reason = str(error)
                except Exception as error:  # noqa: BLE001 — any decoder failure skips the sample, never the run
                    reason = f"{sample.id}: {type(error).__name__}: {error}"
            samples.append((sample.position, sample.id, reason))
        return {"unit": batch.unit, "last": batch.last, "index": torch.tensor(good, dtype=torch.int64),
                "pixels": torch.stack(pixels) if pixels else None, "samples": samples}


def _keep(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _worker_init(_worker_id: int) -> None:
    torch.set_num_threads(1)


class _Plan:
    """The batch plan as a re-iterable object (what DataLoader expects of a batch sampler)."""

    def __init__(self, source: ImageSource, pending: list[tuple[int, int]], batch_size: int):
        self.source, self.pending, self.batch_size = source, pending, batch_size

    def __iter__(self) -> Iterator[Batch]:
        return plan_batches(self.source, self.pending, self.batch_size)


def batch_loader(source: ImageSource, pending: Iterable[tuple[int, int]], batch_size: int, preprocessing, *,
                 workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """Decoded batches (see the module docstring) of the pending ``(unit, start position)`` pairs, in order."""
    return torch.utils.data.DataLoader(
        _Decoder(preprocessing), batch_sampler=_Plan(source, list(pending), batch_size), num_workers=workers,
        collate_fn=_keep, worker_init_fn=_worker_init if workers else None, pin_memory=pin_memory,
        prefetch_factor=2 if workers else None)
