"""Configs of `erasure ddpm {train,unlearn}` (data only: no torch/diffusers import)."""
from __future__ import annotations

from dataclasses import dataclass

from erasure.config import option

DDPM_PRESETS = ("tiny", "fast", "paper")
DDPM_METHODS = ("salun", "ga", "rl", "retrain")


@dataclass
class DDPMTrainConfig:
    """Train a class-conditional DDPM on CIFAR-10."""

    preset: str = option("fast", "model size and schedule", choices=DDPM_PRESETS)
    out: str = option("outputs/ddpm-cifar10", "output directory")
    data_dir: str | None = option(None, "folder holding cifar10_jpeg.npz (default: $ERASURE_DATA_DIR, ../shared/data)")
    seed: int = option(0, "random seed", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished run from its last checkpoint")


@dataclass
class DDPMUnlearnConfig:
    """Unlearn a class from a trained class-conditional DDPM by remapping it to another class."""

    run: str = option("", "the --out directory of a finished `erasure ddpm train` run")
    forget: str = option("0", "the class to forget (name or index)")
    method: str = option("salun", "objective", choices=DDPM_METHODS)
    out: str = option("outputs/ddpm-unlearn", "output directory")
    seed: int = option(0, "random seed", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished run from its last checkpoint")
