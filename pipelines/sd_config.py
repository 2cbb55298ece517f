"""Config of `erasure sd` (data only: no torch/diffusers import, so `--help` is fast).

`--concept NAME` fills every prompt/weight option the user left unset from `configs/concepts/NAME.yaml`;
options given on the command line or in `--config` win over the preset.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from erasure.config import (
    TrackerConfig,
    coerce,
    field_type,
    fields,
    is_section,
    option,
    read_yaml,
    with_method_sections,
)
from erasure.errors import ConfigError
from erasure.evaluation.config import DEFAULT_BASE_MODEL
from pipelines.export_config import FORMATS
from pipelines.method_settings import SD_METHOD_SETTINGS, SD_METHODS

PRESET_DIR = files("configs") / "concepts"  # package data: found from an installed wheel too
DEFAULT_ALPHA = 0.1
DEFAULT_SALUN_RATIO = 0.5


def preset_names() -> list[str]:
    """The concept presets shipped in configs/concepts/."""
    return sorted(p.name.removesuffix(".yaml") for p in PRESET_DIR.iterdir() if p.name.endswith(".yaml"))


def preset_name(concept: str) -> str:
    """'Van Gogh' -> 'van_gogh' (the preset file's stem)."""
    return re.sub(r"[^a-z0-9]+", "_", concept.lower()).strip("_")


@dataclass
class SDEraseSharedConfig(TrackerConfig):
    """The settings every SD erasure method shares; `SDEraseConfig` adds one section per method."""

    concept: str | None = option(None, "a preset from configs/concepts/ (nudity, church, van_gogh); "
                                       "unset options are taken from it")
    model: str = option(DEFAULT_BASE_MODEL, "base model: a hub id, a local diffusers directory, or 'tiny' "
                                            "(a seeded random toy pipeline for offline smoke tests)")
    out: str | None = option(None, "output directory (default: outputs/sd-<concept>)")
    method: str = option("salun", "objective: salun (prompt remap), esd (negative guidance), ga (gradient ascent); "
                                  "its own settings: the section of its name", choices=SD_METHODS)
    forget_prompt: str | None = option(None, "the prompt to erase (e.g. 'a photo of a nude person')")
    retain_prompts: list[str] | None = option(None, "prompts the model keeps: a .txt/.csv file or a list "
                                                    "(default: the remap prompt)")
    forget_images: str | None = option(None, "a folder of forget images to use instead of generating them")
    retain_images: str | None = option(None, "a folder of retain images to use instead of generating them")
    num_images: int = option(800, "images generated for each of the forget and retain sets", ge=1)
    generation_steps: int = option(50, "denoising steps when generating the forget/retain sets", ge=1)
    generation_guidance: float = option(7.5, "guidance scale when generating the forget/retain sets", ge=0)
    generation_batch_size: int = option(8, "images per forward pass when generating", ge=1)
    resolution: int = option(512, "image size of the forget/retain sets in pixels (a multiple of 8)", ge=8)
    mask: str | None = option(None, "reuse this mask.safetensors instead of computing one")
    mask_ratio: float | None = option(None, "share of UNet weights to update (default 0.5 for salun, "
                                            "no mask for esd/ga)", gt=0, lt=1)
    mask_guidance: float = option(7.5, "w of the guided mask loss (1 + w) eps(c) - w eps(null)", ge=0)
    alpha: float | None = option(None, f"weight of the retain diffusion loss (default {DEFAULT_ALPHA})", ge=0)
    lr: float = option(1e-5, "Adam learning rate", gt=0)
    weight_decay: float = option(0.0, "AdamW weight decay (never moves unmasked weights)", ge=0)
    steps: int | None = option(None, "optimizer steps (default: `epochs` passes over the forget set: "
                                      "num_images / batch_size per epoch, as the reference)", ge=1)
    epochs: int | None = option(None, "passes over the forget set when `steps` is unset (default 1; the "
                                      "reference: 1 for nudity, 5 for objects)", ge=1)
    posterior: str = option("sample", "VAE latents of the training images: 'sample' draws a posterior sample per "
                                      "use (the reference's get_input), 'mean' the deterministic posterior mean",
                            choices=("sample", "mean"))
    batch_size: int = option(8, "forget (and retain) images per optimizer step, over all processes and "
                                "micro-steps", ge=1)
    gradient_accumulation_steps: int = option(1, "micro-steps the batch is split into (less memory)", ge=1)
    gradient_checkpointing: bool = option(False, "recompute UNet activations in backward to save memory")
    grad_clip: float | None = option(None, "clip the (masked) gradient to this L2 norm (default: none, as the "
                                           "reference)", gt=0)
    checkpoint_every: int = option(100, "optimizer steps between resumable checkpoints (0: only at the end)", ge=0)
    grid_seeds: int = option(4, "images per prompt in the before/after sample grid (0: no grid)", ge=0)
    export_delta: bool = option(True, "also write delta.safetensors (the changed UNet tensors)")
    export: list[str] = option([], "when the run finishes, also export it in these formats (comma-separated) to "
                                   "<out>/exports/<format>; `erasure export` does the same later", choices=FORMATS)
    seed: int = option(0, "random seed", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished run from its last checkpoint")

    def total_steps(self, forget_images: int) -> int:
        """`steps`, or `epochs` passes over a forget set of `forget_images` in batches of `batch_size`."""
        return self.steps or (self.epochs or 1) * -(-forget_images // self.batch_size)

    def validate(self) -> None:
        """Apply the concept preset to unset options, then fill derived defaults and check prompts."""
        if self.concept:
            self._apply_preset()
        if not self.forget_prompt:
            raise ConfigError("no forget prompt: pass --concept (one of " + ", ".join(preset_names())
                              + ") or --forget-prompt '...'")
        remap_prompt = self.salun.remap_prompt  # the section SDEraseConfig adds
        if self.method == "salun" and not remap_prompt:
            raise ConfigError("method salun needs a remap prompt: pass --remap-prompt '...' or a --concept preset")
        if self.resolution % 8:
            raise ConfigError(f"config key 'resolution' must be a multiple of 8; got {self.resolution}")
        if self.retain_prompts is None:
            self.retain_prompts = [remap_prompt or ""]
        if self.alpha is None:
            self.alpha = DEFAULT_ALPHA
        if self.mask_ratio is None and self.method == "salun" and self.mask is None:
            self.mask_ratio = DEFAULT_SALUN_RATIO
        if self.out is None:
            self.out = f"outputs/sd-{preset_name(self.concept) if self.concept else 'custom'}".replace("_", "-")

    def _apply_preset(self) -> None:
        """Copy the preset's values into options that are still unset (None)."""
        path = PRESET_DIR / f"{preset_name(self.concept)}.yaml"
        if not path.is_file():
            raise ConfigError(f"unknown concept '{self.concept}'; use one of {', '.join(preset_names())} "
                              "or pass --forget-prompt/--remap-prompt/--retain-prompts")
        _fill_unset(self, {k: v for k, v in read_yaml(path).items() if k != "concept"}, path)


def _fill_unset(config: Any, values: dict[str, Any], path: Path, prefix: str = "") -> None:
    """Set each of `values` on `config` where it is still None, descending into method sections."""
    known = {f.name: f for f in fields(type(config))}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown config key '{prefix}{key}' in preset '{path}'")
        if is_section(known[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{prefix}{key}' in preset '{path}' must be a mapping of its settings")
            _fill_unset(getattr(config, key), value, path, prefix=f"{prefix}{key}.")
        elif getattr(config, key) is None:
            setattr(config, key, coerce(prefix + key, value, field_type(type(config), known[key])))


SDEraseConfig = with_method_sections(
    "SDEraseConfig", SDEraseSharedConfig, SD_METHOD_SETTINGS, module=__name__,
    doc="Erase a concept from Stable Diffusion by remapping its prompt (salun), negative guidance (esd) or ascent "
        "(ga), optionally restricted to salient weights: the shared settings plus one section per method (e.g. "
        "`esd: {guidance: 1.0}`, flag --esd-guidance).")
