"""Config of `erasure sd` (data only: no torch/diffusers import, so `--help` is fast)."""
from __future__ import annotations

from dataclasses import dataclass

from erasure.config import option

SD_METHODS = ("salun", "esd", "ga")


@dataclass
class SDEraseConfig:
    """Erase a concept from Stable Diffusion by remapping its prompt, restricted to salient weights."""

    concept: str | None = option(None, "a preset from configs/concepts/ (e.g. nudity, church, van_gogh)")
    model: str = option("CompVis/stable-diffusion-v1-4", "base model: a hub id or a local diffusers directory")
    out: str | None = option(None, "output directory (default: outputs/sd-<concept>)")
    method: str = option("salun", "objective", choices=SD_METHODS)
    forget_prompt: str | None = option(None, "the prompt to erase (overrides the preset)")
    remap_prompt: str | None = option(None, "what the forget prompt should produce instead (overrides the preset)")
    retain_prompts: str | None = option(None, "a .txt/.csv file of prompts whose images the model keeps")
    seed: int = option(0, "random seed", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished run from its last checkpoint")
