"""ESD, Erased Stable Diffusion (Gandikota et al., ICCV 2023): fine-tune the model so that its prediction for
the concept follows the frozen model's negatively guided one, eps(null) - eta (eps(c) - eps(null)).

Reference: rohitgandikota/erasing `train-scripts/train-esd.py` (the paper's code, at 414dc94^). Each iteration
draws t_enc ~ U{0..ddim_steps-1} and, from fresh noise, samples with DDIM (ddim_steps, eta 0, guidance
`start_guidance` 3 under the concept prompt) *by the model being trained*, through its ldm sampler with
`t_start=-1, till_T=t_enc`: the noisiest DDIM timestep is dropped (sampling starts at 961 of 1000), and the steps
of index ddim_steps-2 down to t_enc-1 run, i.e. ddim_steps - t_enc steps (ddim_steps - 1 for t_enc = 0). The
UNet is trained at a DDPM timestep drawn from [round(t_enc / ddim_steps * T), round((t_enc + 1) / ddim_steps * T)),
the target from the frozen base model, loss `nn.MSELoss()`. Parameter scopes as its `train_method`: `esd-x`
('xattn', every attn2 parameter; styles and objects), `esd-u` ('noxattn': everything but attn2, the time
embedding and the output layers `out.`, in diffusers `time_embedding`, `conv_norm_out`, `conv_out`; nudity) and
`esd` ('full'). Its defaults: 1000 iterations of one image, Adam lr 1e-5, eta 1, start guidance 3, 50 DDIM steps.

The repository's later diffusers script (`esd_sd.py`) differs: the *base* model samples x_t (`sampler: base`
here), training uses the sampler's own timestep, the target is written eps(c) - eta' (eps(c) - eps(null)) with
eta' = 2 (the same target as eta = 1 here), 200 iterations at lr 5e-5, and only Linear/Conv weights train.
Departure, as an option: `inputs: noised` forward-noises generated forget images instead of sampling x_t (what
`erasure sd --method esd` did before the reference sampling was the default).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from erasure.config import option
from pipelines.methods.base import (
    CROSS_ATTENTION,
    EVERYTHING,
    TRAINED,
    Chunk,
    Draw,
    MethodSpec,
    Scope,
    Session,
)

if TYPE_CHECKING:
    from torch import Tensor

INPUTS = ("sampled", "noised")
SAMPLERS = ("trained", "base")


@dataclass
class ESDSettings:
    """ESD's settings (shared by esd, esd-x and esd-u)."""

    guidance: float = option(1.0, "negative guidance eta of the target eps(null) - eta (eps(c) - eps(null))", ge=0)
    start_guidance: float = option(3.0, "guidance scale of the DDIM sampling that makes x_t (reference: 3)", ge=0)
    ddim_steps: int = option(50, "DDIM steps of that sampling; each iteration stops it at a random step", ge=1)
    inputs: str = option("sampled", "x_t: 'sampled' by DDIM (the reference) or 'noised' (forward-noised generated "
                                    "forget images)", choices=INPUTS)
    sampler: str = option("trained", "which model samples x_t: the one being 'trained' (train-esd.py, the paper) or "
                                     "the frozen 'base' (the later esd_sd.py)", choices=SAMPLERS)


class ESD:
    """The negative-guidance objective on the reference's self-sampled latents (or noised forget images)."""

    def __init__(self, settings: ESDSettings, scope: Scope = EVERYTHING) -> None:
        self.settings, self.scope = settings, scope
        self.images = ("forget",) if settings.inputs == "noised" else ()
        self.needs_frozen = True
        self.retain_term = False

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
        """The reference's x_t: DDIM from fresh noise under the concept prompt (guidance `start_guidance`) stopped
        as its `till_T = t_enc` stops it, and a DDPM timestep in t_enc's slice of [0, T)."""
        import torch

        from pipelines.objectives import model_timesteps

        steps, total = self.settings.ddim_steps, session.scheduler.config.num_train_timesteps
        t_enc = int(torch.randint(steps, (1,), generator=draw.noise))
        low, high = round(t_enc / steps * total), round((t_enc + 1) / steps * total)
        t = torch.randint(low, max(high, low + 1), (draw.total,), generator=draw.noise)[draw.rows]
        noise = torch.randn((draw.total, *session.latent_shape), generator=draw.noise)[draw.rows]
        x_t = session.sample(noise, session.condition("forget", concept), steps=steps,
                             window=reference_window(t_enc, steps), guidance=self.settings.start_guidance,
                             base=self.settings.sampler == "base")
        return x_t, model_timesteps(session.scheduler, t).to(x_t.device)


def reference_window(t_enc: int, steps: int) -> tuple[int, int]:
    """The DDIM steps (0 = noisiest) the reference's sampler takes with `t_start=-1, till_T=t_enc`: it drops the
    noisiest timestep, runs indices steps-2, steps-3, ... and breaks after index t_enc - 1 (never, for t_enc = 0)."""
    return (1, steps if t_enc == 0 else steps - t_enc + 1)


def _spec(name: str, scope: Scope, reference: str, summary: str) -> MethodSpec:
    return MethodSpec(name=name, summary=summary, source="Gandikota et al. 2023, rohitgandikota/erasing "
                      f"train-scripts/train-esd.py (train_method '{reference}')", kind=TRAINED, settings=ESDSettings,
                      build=functools.partial(ESD, scope=scope), section="esd",
                      defaults={"steps": 1000, "batch_size": 1, "lr": 1e-5})


OUTSIDE_U = ("time_embedding.", "conv_norm_out.", "conv_out.", "time_text_embed.", "norm_out.", "proj_out.")
"""The time embedding and output layers ESD-u leaves alone: the UNet's, and their SD3 transformer counterparts."""


def _unconditioned(name: str) -> bool:
    """ESD-u's parameters: not cross-attention, not the time embedding, not the output layers."""
    return not (CROSS_ATTENTION.includes(name) or name.startswith(OUTSIDE_U))


UNCONDITIONED = Scope("everything but cross-attention, the time embedding and the output layers", _unconditioned)
SPECS = (
    _spec("esd", EVERYTHING, "full", "ESD, negative guidance, the whole UNet"),
    _spec("esd-x", CROSS_ATTENTION, "xattn", "ESD on the cross-attention only (the variant for styles and objects)"),
    _spec("esd-u", UNCONDITIONED, "noxattn", "ESD on everything but the cross-attention (the variant for nudity)"),
)
