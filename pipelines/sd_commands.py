"""Handler of `erasure sd` (heavy imports happen inside it, so `--help` stays fast)."""
from __future__ import annotations

import os

from pipelines.sd_config import SDEraseConfig


def erase_sd(config: SDEraseConfig) -> None:
    """`erasure sd`: erase a concept from Stable Diffusion and save the UNet, mask, delta and grid."""
    from pipelines.stable_diffusion import erase

    metrics = erase(config)
    if os.environ.get("RANK", "0") == "0":
        print(f"erased '{config.forget_prompt}' ({config.method}): forget objective "
              f"{metrics['forget_objective_before']:.4g} -> {metrics['forget_objective_after']:.4g} "
              f"in {metrics['steps']} steps -> {config.out}")
