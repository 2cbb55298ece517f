"""Load a base Stable Diffusion pipeline, or one whose UNet comes from an erased run.

An erased run saves its UNet in diffusers format under `<run>/unet/`, so plain diffusers also works:
`StableDiffusionPipeline.from_pretrained(base, unet=UNet2DConditionModel.from_pretrained(run + "/unet"))`.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from erasure.errors import ErasureError, first_line
from pipelines.schedulers import scheduler_from
from pipelines.testbed_models import TESTBED_DIR, TESTBED_NAME
from pipelines.tiny import TINY_NAME, build_tiny_pipeline


class ModelLoadError(ErasureError):
    """A base model or an erased UNet cannot be loaded."""


def load_base_pipeline(model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       unet: UNet2DConditionModel | None = None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline without safety checker from a hub id, a local directory, 'tiny' or 'testbed'."""
    if model == TESTBED_NAME:
        model = str(TESTBED_DIR)
    if model == TINY_NAME:
        pipe = build_tiny_pipeline()
        if unet is not None:
            pipe.unet = unet
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        extra = {"unet": unet} if unet is not None else {}
        try:
            with _torch_dtype_accepted():
                pipe = StableDiffusionPipeline.from_pretrained(
                    model, torch_dtype=dtype, safety_checker=None, feature_extractor=None,
                    requires_safety_checker=False, **extra)
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


def _check_unet_fits(pipe: StableDiffusionPipeline, model: str) -> None:
    unet, text, vae = pipe.unet.config, pipe.text_encoder.config, pipe.vae.config
    if unet.cross_attention_dim != text.hidden_size or unet.in_channels != vae.latent_channels:
        raise ModelLoadError(
            f"the UNet (cross_attention_dim {unet.cross_attention_dim}, in_channels {unet.in_channels}) does not "
            f"fit base model '{model}' (text width {text.hidden_size}, latent channels {vae.latent_channels}); "
            "pass the --model the run was erased from"
        )


@contextlib.contextmanager
def _torch_dtype_accepted() -> Iterator[None]:
    """`torch_dtype=` works on every supported diffusers; newer ones merely suggest `dtype=` instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        yield

