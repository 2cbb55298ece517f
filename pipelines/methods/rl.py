"""Random labels for a class-conditional DDPM: train the forget images under a random other class (the SalUn
DDPM reference's `rl` branch baseline, `DDPM/runners/diffusion.py`), the diffusion loss summed per image as there.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.methods.base import TRAINED, Chunk, Draw, ImageObjective, MethodSpec, Session


@dataclass
class RLSettings:
    """Random labels have no settings of their own."""


class RandomLabels(ImageObjective):
    """The ordinary diffusion loss of forget images under random other classes."""

    def forget_chunk(self, session: Session, draw: Draw) -> Chunk:
        x0, labels = session.images("forget", draw)
        other = session.condition("other", labels)
        x_t, target, t = session.noised(x0, draw)
        return Chunk(x_t, t, other, target, 1.0, session.reduction)


SPEC = MethodSpec(
    name="rl", summary="train the forgotten class's images under random other classes (class-conditional only)",
    source="baseline of Fan et al. 2024 (SalUn), DDPM/runners/diffusion.py", kind=TRAINED, settings=RLSettings,
    build=RandomLabels)
