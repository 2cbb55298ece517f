"""`erasure export`: a finished SD run -> diffusers pipeline, single-file checkpoint, LoRA or exact delta.

Each export is a run directory of its own (`<run>/exports/<format>` by default) with the artifact, a
manifest and metrics.json; a finished one is never overwritten unless `--overwrite` is given.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file

from erasure.config import to_dict
from erasure.errors import ErasureError
from erasure.io import RunDir, atomic_dir, atomic_path, finished_run
from pipelines.delta import export_delta
from pipelines.export_config import ExportConfig
from pipelines.export_ldm import SINGLE_FILE_FAMILIES, to_ldm_state_dict
from pipelines.export_lora import WEIGHTS_NAME, fused_state, lora_from_difference, prediction_error, summarise
from pipelines.families import denoiser, denoiser_name
from pipelines.loading import load_base_pipeline, load_erased_pipeline, model_family

SINGLE_FILE = "model.safetensors"
DELTA_FILE = "delta.safetensors"


def export_run(config: ExportConfig) -> dict[str, Any]:
    """Write `config.run` in `config.format` under `config.out`; returns the export's metrics."""
    manifest = finished_run(config.run, "`erasure sd`")
    if manifest.get("kind") != "sd-erase":
        raise ErasureError(f"'{config.run}' holds a {manifest.get('kind')} run, not a Stable Diffusion erasure; "
                           "pass the --out folder of an `erasure sd` run to --run")
    base_model = manifest["config"]["model"]
    check_exportable(base_model, config.format)
    out = RunDir(config.out, overwrite=config.overwrite)
    erased = load_erased_pipeline(base_model, config.run)
    out.start(to_dict(config), seed=None, device="cpu", kind=f"export-{config.format}")
    metrics: dict[str, Any] = {"format": config.format, "base_model": base_model, "run": str(config.run)}
    if config.format == "diffusers":
        with atomic_dir(out.path / "pipeline") as tmp:
            erased.save_pretrained(tmp)
        metrics["path"] = str(out.path / "pipeline")
    elif config.format == "single-file":
        metrics.update(write_single_file(erased, out.path / SINGLE_FILE))
    else:
        base_state = _base_unet_state(base_model)
        if config.format == "delta":
            metrics.update(export_delta(base_state, denoiser(erased), out.path / DELTA_FILE, base_model=base_model))
            metrics["path"] = str(out.path / DELTA_FILE)
        else:
            tensors, layers, left_out = lora_from_difference(base_state, denoiser(erased), config.rank,
                                                             bias=config.lora_bias, prefix=denoiser_name(erased))
            with atomic_path(out.path / WEIGHTS_NAME) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
            metrics.update(summarise(layers, left_out, config.rank), path=str(out.path / WEIGHTS_NAME),
                           prediction_error=prediction_error(erased, base_state, fused_state(base_state, tensors)))
    out.finish(metrics)
    return metrics


def check_exportable(base_model: str, fmt: str) -> None:
    """Refuse, in one line, a format the base model's family has no layout for (SD3 and FLUX have no single-file
    one here)."""
    family = model_family(base_model)
    if fmt == "single-file" and family not in SINGLE_FILE_FAMILIES:
        raise ErasureError(f"'{base_model}' is an {family.upper()} model, which has no single-file layout here; "
                           "export it with --format diffusers, lora or delta")


def write_single_file(pipe: StableDiffusionPipeline, path: Path) -> dict[str, Any]:
    """Save UNet + VAE + text encoder(s) as one original-layout .safetensors; returns its tensor count and path."""
    state = to_ldm_state_dict(pipe)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return {"tensors": len(state), "path": str(path)}


def _base_unet_state(base_model: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in denoiser(load_base_pipeline(base_model)).state_dict().items()}


def export_command(config: ExportConfig) -> dict[str, Any]:
    """`erasure export`: write the export and print where it went."""
    metrics = export_run(config)
    detail = (f", rank {metrics['rank']}, worst layer error {metrics['max_relative_error']:.3g}, "
              f"prediction error {metrics['prediction_error']:.3g}"
              if config.format == "lora" else "")
    print(f"exported {config.run} as {config.format}{detail} -> {metrics['path']}")
    return metrics
