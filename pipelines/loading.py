"""Load a base Stable Diffusion pipeline (SD 1.x/2.x, SDXL or SD3, picked from the model's own model_index.json),
or one whose denoiser comes from an erased run.

An erased run saves its denoiser in diffusers format under `<run>/unet/` (`<run>/transformer/` for SD3), so plain
diffusers also works:
`StableDiffusionPipeline.from_pretrained(base, unet=UNet2DConditionModel.from_pretrained(run + "/unet"))`
(`StableDiffusionXLPipeline` for an SDXL base;
`StableDiffusion3Pipeline.from_pretrained(base,
transformer=SD3Transformer2DModel.from_pretrained(run + "/transformer"))` for SD3, `FluxPipeline` and
`FluxTransformer2DModel` for FLUX).
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline
from torch import nn

from erasure.errors import ErasureError, first_line
from erasure.io import read_json
from pipelines.families import FAMILIES, FLOW_MATCHING, denoiser, denoiser_name, family_of, text_conditioning
from pipelines.schedulers import scheduler_from
from pipelines.testbed_models import TESTBED_DIR, TESTBED_NAME
from pipelines.tiny import TINY_BUILDERS, TINY_FLUX_NAME, TINY_SD3_NAME, TINY_SDXL_NAME

DENOISER_FOLDERS = ("unet", "transformer")
"""The folders an erased run keeps its denoiser in: a UNet's, or an SD3 or FLUX transformer's."""


class ModelLoadError(ErasureError):
    """A base model or an erased UNet cannot be loaded."""


def load_base_pipeline(model: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                       erased: dict[str, nn.Module] | None = None) -> Any:
    """A StableDiffusionPipeline (without safety checker), StableDiffusionXLPipeline or StableDiffusion3Pipeline,
    as the model's model_index.json names it, from a hub id, a local directory, 'tiny', 'tiny-sd2', 'tiny-sdxl',
    'tiny-sd3', 'tiny-flux' or 'testbed'; `erased` ({'unet': ...} or {'transformer': ...}) replaces its
    denoiser."""
    model = _resolved(model)
    if model in TINY_BUILDERS:
        pipe = TINY_BUILDERS[model]()
        for name, module in (erased or {}).items():
            setattr(pipe, name, module)
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    else:
        pipeline_class = _pipeline_class(model)
        extra: dict[str, Any] = dict(erased or {})
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
    """`<run_dir>/unet` (or `<run_dir>/transformer`, an SD3 or FLUX run's), or a ModelLoadError when it holds no
    saved denoiser."""
    for name in DENOISER_FOLDERS:
        folder = Path(run_dir) / name
        if (folder / "config.json").is_file():
            return folder
    raise ModelLoadError(
        f"'{run_dir}' holds no erased UNet or transformer ({run_dir}/unet/config.json is missing); "
        "pass the --out directory of a finished `erasure sd` run to --run"
    )


def load_erased_pipeline(base: str, run_dir: str | Path, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> Any:
    """The base pipeline with the denoiser saved by an erased run (`<run_dir>/unet` or `<run_dir>/transformer`)."""
    folder = erased_unet_dir(run_dir)
    try:
        model_class = getattr(diffusers, read_json(folder / "config.json").get("_class_name", ""), None)
        if model_class is None:
            raise ValueError("its config.json names no diffusers model class")
        with _torch_dtype_accepted():
            module = model_class.from_pretrained(folder, torch_dtype=dtype)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the {folder.name} in '{folder}' ({first_line(exc)}); rerun or resume the erasure run"
        ) from None
    return load_base_pipeline(base, device, dtype, erased={folder.name: module})


def set_scheduler(pipe: StableDiffusionPipeline, name: str) -> str:
    """Swap the pipeline's scheduler for `name` ('model' keeps it); returns the class name in use."""
    if name != "model":
        pipe.scheduler = scheduler_from(name, pipe.scheduler.config)
    return type(pipe.scheduler).__name__


def check_scheduler(model: str, name: str) -> None:
    """Refuse, before loading, a `--scheduler` swap on a flow-matching model (SD3, FLUX): the named samplers are
    diffusion (DDPM-family) samplers; such a model keeps its own."""
    family = model_family(model)
    if name != "model" and family in FLOW_MATCHING:
        raise ModelLoadError(f"--scheduler {name} is a diffusion sampler and '{model}' is a flow-matching "
                             f"{family.upper()} model; pass --scheduler model (its own Euler sampler)")


def model_family(model: str) -> str:
    """The family ('sd', 'sdxl', 'sd3' or 'flux') of a base model, read from its model_index.json without loading
    it."""
    if model in TINY_BUILDERS:
        return {TINY_SDXL_NAME: "sdxl", TINY_SD3_NAME: "sd3", TINY_FLUX_NAME: "flux"}.get(model, "sd")
    return FAMILIES[_pipeline_class(_resolved(model)).__name__]


def text_positions(model: str) -> int | None:
    """The token positions of a local base model's text encoder, read from its config without loading it; None
    where that config cannot be read here (a hub id offline, a tiny model built in code)."""
    path = Path(_resolved(model)) / "text_encoder" / "config.json"
    if not path.is_file():
        return None
    return read_json(path).get("max_position_embeddings")


def _resolved(model: str) -> str:
    """`model` with the name 'testbed' replaced by the committed testbed's directory."""
    return str(TESTBED_DIR) if model == TESTBED_NAME else model


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
        raise ModelLoadError(f"'{model}' is a {name}; erasure loads {', '.join(FAMILIES)} models (SD 1.x/2.x, "
                             "SDXL, SD3, FLUX); pass one of those to --model")
    return getattr(diffusers, name)


def _check_unet_fits(pipe: Any, model: str) -> None:
    config, vae = denoiser(pipe).config, pipe.vae.config
    width = text_conditioning(pipe).text_width()
    text = config.get("cross_attention_dim") or config.get("joint_attention_dim")
    packed = 4 if family_of(pipe) == "flux" else 1  # FLUX reads 2x2 patches of latents as channels
    if text != width or config.in_channels != vae.latent_channels * packed:
        raise ModelLoadError(
            f"the {denoiser_name(pipe)} (text width {text}, in_channels {config.in_channels}) does not "
            f"fit base model '{model}' (text width {width}, latent channels {vae.latent_channels}); "
            "pass the --model the run was erased from"
        )


@contextlib.contextmanager
def _torch_dtype_accepted() -> Iterator[None]:
    """`torch_dtype=` works on every supported diffusers; newer ones merely suggest `dtype=` instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        yield

