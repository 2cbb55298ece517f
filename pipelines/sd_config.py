"""Config of `erasure sd` (data only: no torch/diffusers import, so `--help` is fast).

`--concept NAME` fills every prompt/weight option the user left unset from `configs/concepts/NAME.yaml`;
options given on the command line or in `--config` win over the preset. Several concepts are erased in one run
with `--concept a --concept b` (the first preset also fills the scalar options), a `--concepts` file of
(forget, target) rows, or both; `--preserve` lists prompts that must not change.
"""
from __future__ import annotations

import csv
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
    load_yaml,
    option,
    read_yaml,
    reject_other_sections,
    with_method_sections,
)
from erasure.errors import ConfigError
from erasure.evaluation.config import DEFAULT_BASE_MODEL
from erasure.optimizers import OPTIMIZERS, missing_optimizer_package
from pipelines.export_config import FORMATS
from pipelines.methods import SD_METHODS, method_help, method_sections

PRESET_DIR = files("configs") / "concepts"  # package data: found from an installed wheel too
DEFAULT_ALPHA = 0.1
DEFAULT_LR = 1e-5
DEFAULT_BATCH_SIZE = 8
CONCEPT_KEYS = ("forget", "target")


def preset_names() -> list[str]:
    """The concept presets shipped in configs/concepts/."""
    return sorted(p.name.removesuffix(".yaml") for p in PRESET_DIR.iterdir() if p.name.endswith(".yaml"))


def preset_name(concept: str) -> str:
    """'Van Gogh' -> 'van_gogh' (the preset file's stem)."""
    return re.sub(r"[^a-z0-9]+", "_", concept.lower()).strip("_")


@dataclass
class SDEraseSharedConfig(TrackerConfig):
    """The settings every SD erasure method shares; `SDEraseConfig` adds one section per method."""

    concept: list[str] | None = option(None, "presets from configs/concepts/ (nudity, church, van_gogh), "
                                             "repeat the flag for several; unset options are taken from the first")
    concepts: str | None = option(None, "a .yaml (list of {forget, target}) or .csv (columns forget,target) file "
                                        "of more concepts to erase in the same run")
    model: str = option(DEFAULT_BASE_MODEL, "base model (SD 1.x/2.x, SDXL or SD3, read from its model_index.json): a "
                                            "hub id, a local diffusers directory, or 'tiny' / 'tiny-sd2' / 'tiny-sdxl' "
                                            "/ 'tiny-sd3' (seeded random toy pipelines for offline smoke tests)")
    out: str | None = option(None, "output directory (default: outputs/sd-<concept>)")
    method: str = option("salun", method_help(SD_METHODS) + "; its own settings: the section of its name",
                         choices=tuple(SD_METHODS))
    forget_prompt: str | None = option(None, "the prompt to erase (e.g. 'a photo of a nude person')")
    remap_prompt: str | None = option(None, "the forget prompt's target: what salun remaps it to, ca's anchor, "
                                            "uce/rece's target (default for those two: the empty prompt)")
    retain_prompts: list[str] | None = option(None, "prompts the model keeps: a .txt/.csv file or a list "
                                                    "(default: the remap prompts)")
    preserve: list[str] = option([], "prompts that must not change: closed-form methods preserve them in the "
                                     "solve, trained methods add them to the retain prompts")
    forget_images: str | None = option(None, "a folder of forget images to use instead of generating them")
    retain_images: str | None = option(None, "a folder of retain images to use instead of generating them")
    num_images: int = option(800, "images generated for each of the forget and retain sets", ge=1)
    generation_steps: int = option(50, "denoising steps when generating the forget/retain sets", ge=1)
    generation_guidance: float = option(7.5, "guidance scale when generating the forget/retain sets", ge=0)
    generation_batch_size: int = option(8, "images per forward pass when generating", ge=1)
    resolution: int = option(512, "image size of the forget/retain sets in pixels (a multiple of 8)", ge=8)
    mask: str | None = option(None, "reuse this mask.safetensors instead of computing one")
    mask_ratio: float | None = option(None, "share of UNet weights to update, of those the method trains "
                                            "(default 0.5 for salun, no mask for the others)", gt=0, lt=1)
    mask_guidance: float = option(7.5, "w of the guided mask loss (1 + w) eps(c) - w eps(null)", ge=0)
    alpha: float | None = option(None, f"weight of the retain diffusion loss (default {DEFAULT_ALPHA})", ge=0)
    lr: float | None = option(None, f"Adam learning rate (default: the method's, else {DEFAULT_LR})", gt=0)
    weight_decay: float | None = option(None, "AdamW weight decay, never moving unmasked weights (default: the "
                                              "method's (ca: 1e-2), else 0)", ge=0)
    steps: int | None = option(None, "optimizer steps (default: the method's (esd: 1000), else `epochs` passes "
                                      "over the forget set: num_images / batch_size per epoch, as the reference)",
                               ge=1)
    epochs: int | None = option(None, "passes over the forget set when `steps` is unset (default 1; the "
                                      "reference: 1 for nudity, 5 for objects)", ge=1)
    posterior: str = option("sample", "VAE latents of the training images: 'sample' draws a posterior sample per "
                                      "use (the reference's get_input), 'mean' the deterministic posterior mean",
                            choices=("sample", "mean"))
    batch_size: int | None = option(None, "forget (and retain) rows per optimizer step, over all processes and "
                                          f"micro-steps (default: the method's (esd: 1), else {DEFAULT_BATCH_SIZE})",
                                    ge=1)
    gradient_accumulation_steps: int = option(1, "micro-steps the batch is split into (less memory)", ge=1)
    gradient_checkpointing: bool = option(False, "recompute UNet activations in backward to save memory")
    optimizer: str = option("adamw", "adamw, or adamw8bit (bitsandbytes' 8-bit states: about a quarter of AdamW's "
                                     "optimizer memory, for big models)", choices=OPTIMIZERS)
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

    def concept_pairs(self) -> list[tuple[str, str]]:
        """Every (forget prompt, target prompt) of the run, in order, without repeats: the forget/remap prompts,
        the other presets', then the `concepts` file's (a missing target is the empty prompt)."""
        pairs = [(self.forget_prompt, self.remap_prompt or "")] if self.forget_prompt else []
        for name in (self.concept or [])[1:]:
            preset = read_preset(name)
            pairs.append((preset["forget_prompt"], preset.get("remap_prompt") or ""))
        if self.concepts:
            pairs += read_concept_file(self.concepts)
        return list(dict.fromkeys(pairs))

    def validate(self) -> None:
        """Apply the concept presets to unset options, then fill the method's defaults and check prompts."""
        spec = SD_METHODS[self.method]
        if self.concept:
            own_retain = self.retain_prompts is not None
            _fill_unset(self, {k: v for k, v in read_preset(self.concept[0]).items() if k != "concept"},
                        preset_path(self.concept[0]))
            if not own_retain and self.retain_prompts is not None:
                for name in self.concept[1:]:
                    self.retain_prompts += read_preset(name).get("retain_prompts") or []
                self.retain_prompts = list(dict.fromkeys(self.retain_prompts))
        pairs = self.concept_pairs()
        if not pairs:
            raise ConfigError("no forget prompt: pass --concept (one of " + ", ".join(preset_names())
                              + "), --forget-prompt '...' or a --concepts file")
        missing = [forget for forget, target in pairs if not target]
        if spec.needs_target and missing:
            raise ConfigError(f"method {self.method} needs a target (remap) prompt for every concept; "
                              f"'{missing[0]}' has none: pass --remap-prompt '...', a --concept preset or a target "
                              "column in --concepts")
        if self.resolution % 8:
            raise ConfigError(f"config key 'resolution' must be a multiple of 8; got {self.resolution}")
        reject_other_sections(self, method_sections(SD_METHODS), self.method, spec.section_name)
        missing = missing_optimizer_package(self.optimizer)
        if missing and spec.trains:
            raise ConfigError(missing)
        if not spec.trains and (self.mask is not None or self.mask_ratio is not None):
            raise ConfigError(f"method {self.method} is a closed-form edit and takes no saliency mask; drop "
                              "--mask/--mask-ratio or pick a trained method")
        if self.retain_prompts is None:
            self.retain_prompts = list(dict.fromkeys(target for _, target in pairs))
        for key, value in {**{"alpha": DEFAULT_ALPHA, "lr": DEFAULT_LR, "batch_size": DEFAULT_BATCH_SIZE,
                              "weight_decay": 0.0}, **spec.defaults}.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.mask_ratio is None and self.mask is None and spec.trains:
            self.mask_ratio = spec.default_mask_ratio
        if self.out is None:
            name = preset_name("-".join(self.concept)) if self.concept else "custom"
            self.out = f"outputs/sd-{name}".replace("_", "-")


def preset_path(concept: str) -> Path:
    """The file of a concept preset, or a ConfigError listing the presets."""
    path = PRESET_DIR / f"{preset_name(concept)}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown concept '{concept}'; use one of {', '.join(preset_names())} "
                          "or pass --forget-prompt/--remap-prompt/--retain-prompts")
    return path


def read_preset(concept: str) -> dict[str, Any]:
    """The values of a concept preset."""
    return read_yaml(preset_path(concept))


def read_concept_file(path: str) -> list[tuple[str, str]]:
    """(forget, target) rows of a .yaml list of mappings or a .csv with a header naming the columns."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config key 'concepts': no file '{path}'; pass a .yaml or .csv of forget,target rows")
    if file.suffix.lower() == ".csv":
        with file.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    elif file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            rows = load_yaml(file.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"config key 'concepts': '{path}' is not valid YAML ({exc}); fix the syntax") from None
    else:
        raise ConfigError(f"config key 'concepts': '{path}' must be a .yaml or .csv file")
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"config key 'concepts': '{path}' must hold a non-empty list of forget,target rows")
    pairs = []
    for i, row in enumerate(rows):
        unknown = set(row) - set(CONCEPT_KEYS) if isinstance(row, dict) else None
        if unknown is None or unknown or not str(row.get("forget") or "").strip():
            raise ConfigError(f"config key 'concepts': row {i + 1} of '{path}' must have a non-empty 'forget' and "
                              f"optionally 'target' (no other keys); got {row!r}")
        pairs.append((str(row["forget"]).strip(), str(row.get("target") or "").strip()))
    return pairs


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
    "SDEraseConfig", SDEraseSharedConfig, method_sections(SD_METHODS), module=__name__,
    doc="Erase concepts from Stable Diffusion with any registered method (pipelines/methods), trained ones "
        "optionally restricted to salient weights: the shared settings plus one section per method (e.g. "
        "`esd: {guidance: 1.0}`, flag --esd-guidance).")
