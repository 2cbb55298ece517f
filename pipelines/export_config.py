"""Config of `erasure export` (data only: no torch/diffusers import, so `--help` is fast)."""
from __future__ import annotations

from dataclasses import dataclass

from erasure.config import option
from erasure.errors import ConfigError

FORMATS = ("diffusers", "single-file", "lora", "delta")
DEFAULT_LORA_RANK = 16


@dataclass
class ExportConfig:
    """Write a finished `erasure sd` run in a format other tools load: a full diffusers pipeline, one
    original-layout .safetensors (AUTOMATIC1111, ComfyUI), a LoRA (`pipe.load_lora_weights`) or the exact delta."""

    run: str = option("", "the --out directory of a finished `erasure sd` run")
    format: str = option("single-file", "what to write", choices=FORMATS)
    out: str | None = option(None, "output directory (default: <run>/exports/<format>)")
    rank: int = option(DEFAULT_LORA_RANK, "lora: the largest rank per layer (layers of lower full rank keep "
                                          "theirs; a rank >= every layer's full rank is exact)", ge=1)
    lora_bias: bool = option(False, "lora: also carry changed biases (peft lora_bias: diffusers loads it but cannot "
                                    "fuse it, A1111/ComfyUI ignore it)")
    overwrite: bool = option(False, "replace an existing export directory")

    def validate(self) -> None:
        """A run is required; the output defaults to `<run>/exports/<format>`."""
        if not self.run:
            raise ConfigError("config key 'run' is required: pass --run <the --out directory of an `erasure sd` run>")
        if self.out is None:
            self.out = f"{self.run.rstrip('/')}/exports/{self.format}"
