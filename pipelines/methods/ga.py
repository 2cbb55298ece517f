"""Gradient ascent: the negated diffusion loss on forget images (the classic baseline; diverges without a bound).

Used as a baseline in the SalUn paper's tables, reduced as each domain's reference reduces its diffusion loss
(SD `gradient_ascent.py`: the mean; DDPM: the sum per image). On Stable Diffusion no retain term (only the forget
images are seen, as the reference); the DDPM command adds its alpha-weighted retain term to every method.
"""
from __future__ import annotations

from dataclasses import dataclass

from pipelines.methods.base import TRAINED, Chunk, Draw, ImageObjective, MethodSpec, Session


@dataclass
class GASettings:
    """Gradient ascent has no settings of its own."""


class GradientAscent(ImageObjective):
    """Ascend the diffusion loss of the forget prompt on forget images."""

    def forget_chunk(self, session: Session, draw: Draw) -> Chunk:
        x0, concept = session.images("forget", draw)
        x_t, target, t = session.noised(x0, draw)
        return Chunk(x_t, t, session.condition("forget", concept), target, -1.0, session.reduction)


SPEC = MethodSpec(
    name="ga", summary="gradient ascent on the forget images' diffusion loss",
    source="baseline of Fan et al. 2024 (SalUn)", kind=TRAINED, settings=GASettings, build=GradientAscent)
