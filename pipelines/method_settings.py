"""Each diffusion unlearning method's own settings, and one registry of method names per domain.

Light on purpose (no torch/diffusers): the registries feed `--method` choices, `--help` and YAML validation. A
method's settings live under its name in a config (`salun: {mask_ratio: 0.5}`, `esd: {guidance: 1.0}`); the
historical flags (`--mask-ratio`, `--remap`, `--remap-prompt`, `--esd-guidance`) keep working. The settings every
method shares (retain weight, optimiser, data) stay on the command's config.
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


@dataclass
class SDSalUnSettings:
    """SD `salun`: remap the forget prompt to another prompt."""

    remap_prompt: str | None = option(None, "what the forget prompt should produce instead", flag="remap-prompt")


@dataclass
class ESDSettings:
    """SD `esd`: negative guidance away from the concept."""

    guidance: float = option(1.0, "negative guidance eta of the esd target", ge=0)


SD_METHOD_SETTINGS: dict[str, type] = {"salun": SDSalUnSettings, "esd": ESDSettings, "ga": NoSettings}
SD_METHODS = tuple(SD_METHOD_SETTINGS)
