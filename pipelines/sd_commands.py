"""Handler of `erasure sd` (heavy imports happen inside it, so `--help` stays fast)."""
from __future__ import annotations

import os

from pipelines.export_config import ExportConfig
from pipelines.sd_config import SDEraseConfig


def erase_sd(config: SDEraseConfig) -> None:
    """`erasure sd`: erase a concept from Stable Diffusion and save the UNet, mask, delta and grid (+ `--export`s)."""
    from pipelines.export import check_exportable
    from pipelines.stable_diffusion import erase

    for fmt in config.export:  # before any training
        check_exportable(config.model, fmt)
    metrics = erase(config)
    if os.environ.get("RANK", "0") != "0":
        return
    concepts = ", ".join(f"'{c['forget']}'" for c in metrics["concepts"])
    if "forget_objective_before" in metrics:
        print(f"erased {concepts} ({config.method}): forget objective {metrics['forget_objective_before']:.4g} -> "
              f"{metrics['forget_objective_after']:.4g} in {metrics['steps']} steps -> {config.out}")
    else:
        print(f"erased {concepts} ({config.method}, closed form) in {metrics['edit_seconds']:.2f}s -> {config.out}")
    if config.export:
        from pipelines.export import export_command

        for fmt in config.export:
            export = ExportConfig(run=config.out, format=fmt, overwrite=config.overwrite)
            export.validate()
            export_command(export)
