"""Deterministic random streams: every draw of a run is a pure function of (seed, stream, index).

A loop asks for "the generator of stream S at step i" or "the indices of batch i" instead of
advancing a global RNG, so a resumed run draws exactly what an uninterrupted one would, and
data-parallel processes can each take their rows of one global batch.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import Tensor


def stream_seed(seed: int, stream: int, index: int) -> int:
    """The seed of item `index` of random stream `stream` of a run seeded with `seed`."""
    return (seed * 1_000_003 + stream * 7_919 + index) % (2**63)


def stream_generator(seed: int, stream: int, index: int) -> torch.Generator:
    """A CPU generator for item `index` of a stream."""
    return torch.Generator().manual_seed(stream_seed(seed, stream, index))


@lru_cache(maxsize=4)
def _permutation(n: int, seed: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def epoch_batch(n: int, batch_size: int, step: int, seed: int, stream: int) -> Tensor:
    """Indices of batch `step` when `n` examples are reshuffled every pass (the last batch of a pass may be short)."""
    per_pass = -(-n // batch_size)
    epoch, position = divmod(step, per_pass)
    order = _permutation(n, stream_seed(seed, stream, epoch))
    return order[position * batch_size:(position + 1) * batch_size]


def endless_batch(n: int, batch_size: int, step: int, seed: int, stream: int) -> Tensor:
    """Indices of the `step`-th full batch of an endless stream of per-pass shuffles of `n` examples."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    passes = {int(p): torch.randperm(n, generator=stream_generator(seed, stream, int(p)))
              for p in torch.unique(positions // n)}
    return torch.stack([passes[int(p) // n][int(p) % n] for p in positions])
