"""Configs of the diffusion commands (data only: no torch/diffusers import, so `--help` is fast)."""
from __future__ import annotations

from dataclasses import dataclass

from erasure.config import option
from erasure.errors import ConfigError
from erasure.evaluation.config import DEFAULT_BASE_MODEL, DTYPES, SCHEDULERS, check_device
from pipelines.ddpm_config import DEFAULT_GUIDANCE

SD_GUIDANCE = 7.5


@dataclass
class SampleConfig:
    """Generate one image per prompt from a base or erased Stable Diffusion model, or N images of a class
    from a class-conditional DDPM run (`--run <ddpm run> --class <name>`)."""

    prompts: str = option("", "prompt file: .csv with a 'prompt' column (e.g. I2P) or .txt with one prompt per line")
    class_name: str | None = option(None, "DDPM runs: the class to generate (name or index)", flag="class")
    n: int = option(16, "DDPM runs: images to generate of --class (seeds seed, seed + 1, ...)", ge=1)
    out: str = option("outputs/samples", "output directory (PNGs, prompts.jsonl, manifest.json)")
    model: str = option(DEFAULT_BASE_MODEL,
                        "base model (SD 1.x/2.x or SDXL): a hub id (cached locally), a local diffusers "
                        "directory, or 'tiny' / 'tiny-sdxl' (seeded random toy pipelines for offline smoke tests)")
    run: str | None = option(None, "an erased run directory whose unet/ (SD3: transformer/) replaces the base model's")
    subset: str | None = option(None, "keep only prompts whose 'categories' contain this (e.g. sexual)")
    limit: int | None = option(None, "use only the first N prompts (after --subset)", ge=1)
    height: int = option(512, "image height in pixels (a multiple of 8)", ge=8)
    width: int = option(512, "image width in pixels (a multiple of 8)", ge=8)
    steps: int = option(50, "denoising steps", ge=1)
    scheduler: str = option("model", "sampler; 'model' keeps the pipeline's own", choices=SCHEDULERS)
    guidance: float | None = option(None, "classifier-free guidance (prompts whose file gives none); default: "
                                          f"{SD_GUIDANCE} for Stable Diffusion, w = {DEFAULT_GUIDANCE} for a DDPM",
                                    ge=0)
    seed: int = option(0, "seed of prompt row i is seed + i when the file gives no seed", ge=0)
    batch_size: int = option(8, "images per forward pass (prompts are batched per guidance value)", ge=1)
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:N or mps")
    dtype: str = option("auto", "weights/compute dtype; auto is bf16 on CUDA and fp32 elsewhere", choices=DTYPES)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished output directory, skipping images that exist")

    def validate(self) -> None:
        """Cross-field checks."""
        if not self.prompts and self.class_name is None:
            raise ConfigError("config key 'prompts' is required: pass --prompts <file.csv|file.txt> "
                              "(or --run <ddpm run> --class <name> for a class-conditional DDPM)")
        if self.guidance is None:
            self.guidance = SD_GUIDANCE if self.class_name is None else DEFAULT_GUIDANCE
        if self.height % 8 or self.width % 8:
            raise ConfigError(f"height and width must be multiples of 8, got {self.height}x{self.width}")
        check_device("device", self.device)
