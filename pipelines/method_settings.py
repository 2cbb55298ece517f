"""The DDPM unlearning methods' own settings and their registry (Stable Diffusion's methods are modules of
`pipelines.methods`).

Light on purpose (no torch/diffusers): the registry feeds `--method` choices, `--help` and YAML validation. A
method's settings live under its name in a config (`salun: {mask_ratio: 0.5}`); the historical flags
(`--mask-ratio`, `--remap`) keep working. The settings every method shares stay on the command's config.
"""
from __future__ import annotations

from dataclasses import dataclass

from erasure.config import option

DEFAULT_GUIDANCE = 2.0


@dataclass
class NoSettings:
    """A method without knobs of its own."""


@dataclass
class DDPMSalUnSettings:
    """DDPM `salun`: remap the forgotten class, under a saliency mask."""

    remap: str | None = option(None, "the class the forgotten one is mapped to (default: (forget + 1) mod 10)",
                               flag="remap")
    mask_ratio: float = option(0.5, "share of UNet weights the saliency mask keeps", gt=0, lt=1, flag="mask-ratio")
    mask_batches: int | None = option(None, "forget batches whose clipped gradients make the mask (default: the "
                                            "whole forget class, as the reference)", ge=1, flag="mask-batches")
    mask_guidance: float = option(DEFAULT_GUIDANCE, "guidance w of the mask loss (1 + w) eps(c) - w eps(null), as "
                                                    "the reference (2); 0 is the unguided conditional loss", ge=0,
                                  flag="mask-guidance")


DDPM_METHOD_SETTINGS: dict[str, type] = {"salun": DDPMSalUnSettings, "ga": NoSettings, "rl": NoSettings}
DDPM_METHODS = tuple(DDPM_METHOD_SETTINGS)
