"""Diffusion models: Stable Diffusion loading, sampling and erasure (imports diffusers lazily)."""
from __future__ import annotations

import logging
from typing import Any

# Importing StableDiffusionPipeline makes transformers 5 warn that the CLIP and Siglip image processors want
# torchvision and fall back to PIL ones. Pipelines here load without a feature extractor: drop that noise.
logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision" not in record.getMessage())

_LAZY = {"load_erased_pipeline": "pipelines.loading", "load_base_pipeline": "pipelines.loading"}


def __getattr__(name: str) -> Any:
    """`from pipelines import load_erased_pipeline` without importing diffusers at package import."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute '{name}'")
