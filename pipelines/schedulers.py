"""The samplers a `--scheduler` option names, built from a model's own scheduler config.

Kept apart from `pipelines.loading` so the DDPM paths do not import the Stable Diffusion pipeline
(and transformers) just to pick a sampler.
"""
from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
)

SCHEDULER_CLASSES = {
    "ddim": DDIMScheduler,
    "pndm": PNDMScheduler,
    "lms": LMSDiscreteScheduler,
    "euler": EulerDiscreteScheduler,
    "dpmsolver": DPMSolverMultistepScheduler,
}


def scheduler_from(name: str, config: Any) -> Any:
    """A fresh `name` scheduler (a key of SCHEDULER_CLASSES) with a model's scheduler `config`."""
    return SCHEDULER_CLASSES[name].from_config(config)
