"""Diffusion models: Stable Diffusion loading, sampling and erasure (imports diffusers lazily)."""
from __future__ import annotations

from typing import Any

_LAZY = {"load_erased_pipeline": "pipelines.loading", "load_base_pipeline": "pipelines.loading"}


def __getattr__(name: str) -> Any:
    """`from pipelines import load_erased_pipeline` without importing diffusers at package import."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pipelines' has no attribute '{name}'")
