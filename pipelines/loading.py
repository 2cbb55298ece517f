"""Load a base Stable Diffusion pipeline (SD 1.x/2.x or SDXL, picked from the model's own model_index.json), or
one whose UNet comes from an erased run.

An erased run saves its UNet in diffusers format under `<run>/unet/`, so plain diffusers also works:
`StableDiffusionPipeline.from_pretrained(base, unet=UNet2DConditionModel.from_pretrained(run + "/unet"))`
(`StableDiffusionXLPipeline` for an SDXL base).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, UNet2DConditionModel

from erasure.errors import ErasureError, first_line
from pipelines.families import FAMILIES, text_conditioning
from pipelines.schedulers import scheduler_from
from pipelines.testbed_models import TESTBED_DIR, TESTBED_NAME
from pipelines.tiny import TINY_BUILDERS, TINY_SDXL_NAME


class ModelLoadError(ErasureError):
    """A base model or an erased UNet cannot be loaded."""


def load_base_pipeline(model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       unet: UNet2DConditionModel | None = None) -> Any:
    """A StableDiffusionPipeline (without safety checker) or StableDiffusionXLPipeline, as the model's
    model_index.json names it, from a hub id, a local directory, 'tiny', 'tiny-sdxl' or 'testbed'."""
    if model == TESTBED_NAME:
        model = str(TESTBED_DIR)
    if model in TINY_BUILDERS:
        pipe = TINY_BUILDERS[model]()
        if unet is not None:
            pipe.unet = unet
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipeline_class = _pipeline_class(model)
        extra: dict[str, Any] = {"unet": unet} if unet is not None else {}
        if pipeline_class is StableDiffusionPipeline:
            extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        try:
            with _torch_dtype_accepted():
                pipe = pipeline_class.from_pretrained(model, torch_dtype=dtype, **extra)
        except (OSError, ValueError) as exc:
            if Path(model).exists():
                raise ModelLoadError(
                    f"'{model}' is not a diffusers Stable Diffusion directory ({first_line(exc)}); "
                    "pass a folder written by save_pretrained (with model_index.json) to --model"
                ) from None
            raise ModelLoadError(
                f"could not load model '{model}' offline or from the hub ({first_line(exc)}); "
                "pass a local diffusers directory with --model"
            ) from None
    _check_unet_fits(pipe, model)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def erased_unet_dir(run_dir: str | Path) -> Path:
    """`<run_dir>/unet`, or a ModelLoadError when it holds no saved UNet."""
    unet_dir = Path(run_dir) / "unet"
    if not (unet_dir / "config.json").is_file():
        raise ModelLoadError(
            f"'{run_dir}' holds no erased UNet ({unet_dir}/config.json is missing); "
            "pass the --out directory of a finished `erasure sd` run to --run"
        )
    return unet_dir


def load_erased_pipeline(base: str, run_dir: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> StableDiffusionPipeline:
    """The base pipeline with the UNet saved by an erased run (`<run_dir>/unet`)."""
    unet_dir = erased_unet_dir(run_dir)
    try:
        with _torch_dtype_accepted():
            unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the UNet in '{unet_dir}' ({first_line(exc)}); rerun or resume the erasure run"
        ) from None
    return load_base_pipeline(base, device, dtype, unet=unet)


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> str:
    """Swap the pipeline's scheduler for `name` ('model' keeps it); returns the class name in use."""
    if name != "model":
        pipe.scheduler = scheduler_from(name, pipe.scheduler.config)
    return type(pipe.scheduler).__name__


def model_family(model: str) -> str:
    """The family ('sd' or 'sdxl') of a base model, read from its model_index.json without loading it."""
    if model in TINY_BUILDERS:
        return "sdxl" if model == TINY_SDXL_NAME else "sd"
    return FAMILIES[_pipeline_class(str(TESTBED_DIR) if model == TESTBED_NAME else model).__name__]


def _pipeline_class(model: str) -> type:
    """The pipeline class model_index.json names (SD when it cannot be read: from_pretrained then says why); a
    family erasure does not train is refused by name."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name = DiffusionPipeline.load_config(model).get("_class_name")
    except (OSError, ValueError):
        return StableDiffusionPipeline
    if name not in FAMILIES:
        raise ModelLoadError(f"'{model}' is a {name}; erasure loads {' and '.join(FAMILIES)} models (SD 1.x/2.x, "
                             "SDXL); pass one of those to --model")
    return getattr(diffusers, name)


def _check_unet_fits(pipe: Any, model: str) -> None:
    unet, vae = pipe.unet.config, pipe.vae.config
    width = text_conditioning(pipe).text_width()
    if unet.cross_attention_dim != width or unet.in_channels != vae.latent_channels:
        raise ModelLoadError(
            f"the UNet (cross_attention_dim {unet.cross_attention_dim}, in_channels {unet.in_channels}) does not "
            f"fit base model '{model}' (text width {width}, latent channels {vae.latent_channels}); "
            "pass the --model the run was erased from"
        )


@contextlib.contextmanager
def _torch_dtype_accepted() -> Iterator[None]:
    """`torch_dtype=` works on every supported diffusers; newer ones merely suggest `dtype=` instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        yield

