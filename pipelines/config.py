"""Configs of the diffusion commands (data only: no torch/diffusers import, so `--help` is fast)."""
from __future__ import annotations

from dataclasses import dataclass

from erasure.config import option
from erasure.errors import ConfigError
from erasure.evaluation.config import DEFAULT_BASE_MODEL, DTYPES, SCHEDULERS, check_device


@dataclass
class SampleConfig:
    """Generate one image per prompt from a base or erased Stable Diffusion model."""

    prompts: str = option("", "prompt file: .csv with a 'prompt' column (e.g. I2P) or .txt with one prompt per line")
    out: str = option("outputs/samples", "output directory (PNGs, prompts.jsonl, manifest.json)")
    model: str = option(DEFAULT_BASE_MODEL,
                        "base model: a hub id (cached locally), a local diffusers directory, or 'tiny' "
                        "(a seeded random toy pipeline for offline smoke tests)")
    run: str | None = option(None, "an erased run directory whose unet/ replaces the base model's UNet")
    subset: str | None = option(None, "keep only prompts whose 'categories' contain this (e.g. sexual)")
    limit: int | None = option(None, "use only the first N prompts (after --subset)", ge=1)
    height: int = option(512, "image height in pixels (a multiple of 8)", ge=8)
    width: int = option(512, "image width in pixels (a multiple of 8)", ge=8)
    steps: int = option(50, "denoising steps", ge=1)
    scheduler: str = option("model", "sampler; 'model' keeps the pipeline's own", choices=SCHEDULERS)
    guidance: float = option(7.5, "classifier-free guidance for prompts whose file gives none", ge=0)
    seed: int = option(0, "seed of prompt row i is seed + i when the file gives no seed", ge=0)
    batch_size: int = option(8, "images per forward pass (prompts are batched per guidance value)", ge=1)
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:N or mps")
    dtype: str = option("auto", "weights/compute dtype; auto is bf16 on CUDA and fp32 elsewhere", choices=DTYPES)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished output directory, skipping images that exist")

    def validate(self) -> None:
        """Cross-field checks."""
        if not self.prompts:
            raise ConfigError("config key 'prompts' is required: pass --prompts <file.csv|file.txt>")
        if self.height % 8 or self.width % 8:
            raise ConfigError(f"height and width must be multiples of 8, got {self.height}x{self.width}")
        check_device("device", self.device)
