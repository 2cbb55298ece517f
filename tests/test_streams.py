"""Random streams: distinct (seed, stream, index) triples give distinct seeds; stream ids are unique."""
from __future__ import annotations

import pytest

import classifiers.loop  # noqa: F401  (registers the classifier streams)
import pipelines.ddpm_commands  # noqa: F401  (registers the DDPM streams)
import pipelines.stable_diffusion  # noqa: F401  (registers the Stable Diffusion streams)
from erasure.streams import STREAMS, register_streams, stream_seed


def test_every_domain_registers_its_streams() -> None:
    domains = {name.split(".")[0] for name in STREAMS.values()}
    assert {"classifier", "ddpm", "sd"} <= domains
    assert len(STREAMS) == len(set(STREAMS.values()))


@pytest.mark.slow  # the default suite ran 373 s of its 300 s budget
def test_distinct_triples_give_distinct_seeds() -> None:
    triples = [(seed, stream, index) for seed in range(4) for stream in STREAMS for index in range(50_001)]
    assert len({stream_seed(*triple) for triple in triples}) == len(triples)


def test_former_linear_collision_is_gone() -> None:
    assert stream_seed(0, 3, 7920) != stream_seed(0, 4, 1)


def test_a_stream_cannot_be_registered_twice() -> None:
    name = next(iter(STREAMS.values()))
    domain, purpose = name.split(".", 1)
    with pytest.raises(ValueError, match="already registered"):
        register_streams(domain, purpose)
