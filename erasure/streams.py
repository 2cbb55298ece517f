"""Deterministic random streams: every draw of a run is a pure function of (seed, stream, index).

A loop asks for "the generator of stream S at step i" or "the indices of batch i" instead of
advancing a global RNG, so a resumed run draws exactly what an uninterrupted one would, and
data-parallel processes can each take their rows of one global batch.
"""
from __future__ import annotations

import hashlib
from functools import lru_cache

import torch
from torch import Tensor

STREAMS: dict[int, str] = {}
"""Every registered stream id and its name ("domain.purpose"): one registry for all domains."""


def register_streams(domain: str, *purposes: str) -> tuple[int, ...]:
    """Register the streams `domain.purpose` and return their ids (a 31-bit hash of the name).

    Hashed ids are far apart, so a loop that offsets an id (per process, per sub-stream) does not land on
    another stream; registering a name twice, or a name whose id is taken, raises ValueError.
    """
    ids = []
    for name in (f"{domain}.{purpose}" for purpose in purposes):
        stream = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") >> 1
        if stream in STREAMS:
            raise ValueError(f"stream '{name}' (id {stream}) is already registered as '{STREAMS[stream]}'")
        STREAMS[stream] = name
        ids.append(stream)
    return tuple(ids)


def stream_seed(seed: int, stream: int, index: int) -> int:
    """The seed of item `index` of random stream `stream` of a run seeded with `seed`.

    A 64-bit BLAKE2b hash of the triple: unlike a linear mix, distinct triples give unrelated seeds.
    """
    triple = f"{seed}:{stream}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(triple, digest_size=8).digest(), "little")


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
