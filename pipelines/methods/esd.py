"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023): fine-tune the model so that its prediction for
the concept follows the frozen model's negatively guided one, eps(null) - eta (eps(c) - eps(null)).

Reference: rohitgandikota/erasing, `train-scripts/train-esd.py`. Each iteration draws a stop index
t_enc ~ U{0..ddim_steps-1}, samples from fresh noise with DDIM (ddim_steps, eta 0) under the concept prompt with
guidance `start_guidance` (3), *by the model being trained*, for t_enc steps, and trains at a DDPM timestep drawn
uniformly from [round(t_enc / ddim_steps * T), round((t_enc + 1) / ddim_steps * T)). (The reference pairs the
latent after t_enc denoising steps with that timestep as written; we keep its pairing.) The target comes from the
frozen base model. Parameter scopes as the reference's `train_method`: `esd-x` ('xattn') trains the cross-
attention only (styles and objects), `esd-u` ('noxattn') everything but the cross-attention (nudity), `esd`
('full') the whole UNet. Reference defaults: 1000 iterations of one image, Adam lr 1e-5, eta 1.

Departure, as an option: `inputs: noised` forward-noises generated forget images instead of sampling x_t (what
`erasure sd --method esd` did before the reference sampling was the default).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from erasure.config import option
from pipelines.methods.base import TRAINED, Chunk, Draw, MethodSpec, Session, cross_attention

if TYPE_CHECKING:
    from torch import Tensor

INPUTS = ("sampled", "noised")


@dataclass
class ESDSettings:
    """ESD's settings (shared by esd, esd-x and esd-u)."""

    guidance: float = option(1.0, "negative guidance eta of the target eps(null) - eta (eps(c) - eps(null))", ge=0)
    start_guidance: float = option(3.0, "guidance scale of the DDIM sampling that makes x_t (reference: 3)", ge=0)
    ddim_steps: int = option(50, "DDIM steps of that sampling; each iteration stops it at a random step", ge=1)
    inputs: str = option("sampled", "x_t: 'sampled' by the model being trained (the reference) or 'noised' "
                                    "(forward-noised generated forget images)", choices=INPUTS)


class ESD:
    """The negative-guidance objective on the reference's self-sampled latents (or noised forget images)."""

    def __init__(self, settings: ESDSettings) -> None:
        self.settings = settings
        self.images = ("forget",) if settings.inputs == "noised" else ()
        self.needs_frozen = True

    def forget_chunk(self, session: Session, draw: Draw) -> Chunk:
        if self.settings.inputs == "noised":
            x0, concept = session.images("forget", draw)
            x_t, _, t = session.noised(x0, draw)
        else:
            concept = session.concept_of_step(draw, draw.total)[draw.rows]
            x_t, t = self.sampled_inputs(session, concept, draw)
        condition = session.condition("forget", concept)
        null = session.condition("null", concept)
        unconditional = session.frozen(x_t, t, null)
        target = unconditional - self.settings.guidance * (session.frozen(x_t, t, condition) - unconditional)
        return Chunk(x_t, t, condition, target, 1.0)

    def sampled_inputs(self, session: Session, concept: Tensor, draw: Draw) -> tuple[Tensor, Tensor]:
        """The reference's x_t: t_enc DDIM steps from fresh noise under the concept prompt (guidance
        `start_guidance`) by the model being trained, and a DDPM timestep in t_enc's slice of [0, T)."""
        import torch

        steps, total = self.settings.ddim_steps, session.scheduler.config.num_train_timesteps
        stop = int(torch.randint(steps, (1,), generator=draw.noise))
        low, high = round(stop / steps * total), round((stop + 1) / steps * total)
        t = torch.randint(low, max(high, low + 1), (draw.total,), generator=draw.noise)[draw.rows]
        noise = torch.randn((draw.total, *session.latent_shape), generator=draw.noise)[draw.rows]
        x_t = session.sample(noise, session.condition("forget", concept), steps=steps, stop=stop,
                             guidance=self.settings.start_guidance)
        return x_t, t.to(x_t.device)


def _full(name: str) -> bool:
    return True


def _not_cross_attention(name: str) -> bool:
    return not cross_attention(name)


def _spec(name: str, scope_name: str, scope, summary: str) -> MethodSpec:  # noqa: ANN001
    return MethodSpec(name=name, summary=summary, source="Gandikota et al. 2023, rohitgandikota/erasing "
                      "train-scripts/train-esd.py", kind=TRAINED, settings=ESDSettings, build=ESD, section="esd",
                      retain_term=False, scope=scope, scope_name=scope_name,
                      defaults={"steps": 1000, "batch_size": 1, "lr": 1e-5})


SPECS = (
    _spec("esd", "the whole UNet (the reference's 'full')", _full, "ESD, negative guidance, the whole UNet"),
    _spec("esd-x", "cross-attention (attn2) only (the reference's 'xattn')", cross_attention,
          "ESD on the cross-attention only (the variant for styles and objects)"),
    _spec("esd-u", "everything but cross-attention (the reference's 'noxattn')", _not_cross_attention,
          "ESD on everything but the cross-attention (the variant for nudity)"),
)
