"""SalUn (Fan et al., ICLR 2024): remap each forget prompt (or class) to its target under a weight-saliency mask.

Reference: OPTML-Group/Unlearn-Saliency, `SD/train-scripts/random_label.py` and `nsfw_removal.py` for Stable
Diffusion, `DDPM/runners/diffusion.py` for the DDPM. On a noised forget image x_t the model's prediction for the
forget prompt is pulled to its own (stop-gradient) prediction for the remap prompt,
MSE(eps(x_t, t, c_forget), sg eps(x_t, t, c_remap)) (a mean, `nn.MSELoss()`, in both references), plus alpha
times the ordinary diffusion loss on retain images; only the top half of the weights by |gradient| of the
guided forget loss move.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from pipelines.methods.base import TRAINED, Chunk, Draw, ImageObjective, MethodSpec, Session

DEFAULT_GUIDANCE = 2.0
"""The DDPM's guidance w, (1 + w) eps(c) - w eps(null): the reference's mask and sampling value."""


@dataclass
class SalUnSettings:
    """SalUn has no settings beyond the shared ones (remap prompt, mask ratio, alpha)."""


class SalUn(ImageObjective):
    """The remap objective."""

    retain_term = True

    def forget_chunk(self, session: Session, draw: Draw) -> Chunk:
        x0, concept = session.images("forget", draw)
        x_t, _, t = session.noised(x0, draw)
        target = session.current(x_t, t, session.condition("target", concept))
        return Chunk(x_t, t, session.condition("forget", concept), target, 1.0)


SPEC = MethodSpec(
    name="salun", summary="remap the forget prompt to the remap prompt, under a saliency mask",
    source="Fan et al. 2024, OPTML-Group/Unlearn-Saliency SD/train-scripts", kind=TRAINED, settings=SalUnSettings,
    build=SalUn, needs_target=True, default_mask_ratio=0.5)
DDPM_SPEC = dataclasses.replace(SPEC, summary="remap the forgotten class to another class, under a saliency mask")
