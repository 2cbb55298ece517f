"""`erasure testbed build`: a CIFAR-10 text-to-image model a CPU trains within an hour, saved as a diffusers
`StableDiffusionPipeline`, with the CIFAR-10 classifier that judges its generations.

Stages, each a run directory under `out/` that a resumed build skips once finished (and resumes from its last
checkpoint while unfinished): `judge/` (`erasure classifier train` on its config), `vae/` (16 px <-> 8x8x4),
`latents/` (every training image encoded once), `unet/` (UNet + text encoder trained jointly on the cached latents
with captions from pipelines.testbed_captions, EMA weights saved). The pipeline lands in `out/pipeline/`.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from classifiers.config import TrainConfig
from erasure.accel import make_accelerator
from erasure.config import load_config, to_dict
from erasure.datasets import ImageSet, load_cifar10
from erasure.io import RunDir, atomic_dir, atomic_path, finished_manifest
from erasure.streams import epoch_batch, register_streams, stream_generator
from pipelines.ddpm import DiffusionLoop, LoopSettings, take
from pipelines.objectives import diffusion_loss
from pipelines.testbed_captions import CLASSES, SYNONYMS, TRAIN_TEMPLATES, caption
from pipelines.testbed_config import TestbedBuildConfig
from pipelines.testbed_models import (
    RESOLUTION,
    build_text_encoder,
    build_tokenizer,
    build_unet,
    build_vae,
    sampling_scheduler,
    training_scheduler,
)

STAGES = ("judge", "vae", "latents", "unet")
PIPELINE_DIR = "pipeline"
LATENTS_FILE = "latents.safetensors"
VAE_STREAM, LATENT_STREAM, DATA_STREAM, CAPTION_STREAM, NOISE_STREAM, FLIP_STREAM = register_streams(
    "testbed", "vae", "latent", "data", "caption", "noise", "flip")


class Denoiser(nn.Module):
    """The trained pair: text encoder -> prompt embeddings -> UNet noise prediction (as the pipeline calls them)."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module):
        super().__init__()
        self.unet, self.text_encoder = unet, text_encoder

    def forward(self, latents: Tensor, t: Tensor, input_ids: Tensor) -> Tensor:
        return self.unet(latents, t, self.text_encoder(input_ids)[0]).sample


def training_images(config: TestbedBuildConfig) -> ImageSet:
    """All 50,000 CIFAR-10 training images at 16 px (limited to `train_limit`)."""
    data = load_cifar10(config.data_dir, resolution=RESOLUTION)
    images = ImageSet(torch.cat([data.train.images, data.val.images]), torch.cat([data.train.labels, data.val.labels]))
    return images.subset(torch.arange(min(config.train_limit or len(images), len(images))))


def _stage(out: Path, name: str, config: TestbedBuildConfig,
           work: Callable[[RunDir], dict[str, Any]]) -> dict[str, Any]:
    """Run stage `name` in `out/name` unless it has finished; its manifest (with wall_seconds) either way."""
    folder = out / name
    if finished_manifest(folder) is None:
        run = RunDir(folder, resume=True)
        run.start(to_dict(config), seed=config.seed, device="cpu", kind=f"testbed-{name}")
        run.finish(work(run))
    return finished_manifest(folder)  # type: ignore[return-value]


def _elapsed(manifest: dict[str, Any]) -> float:
    """Seconds from a stage's first start to its end, across resumes (a manifest's wall_seconds is the last run's)."""
    start, end = (dt.datetime.fromisoformat(manifest[key]) for key in ("started", "ended"))
    return (end - start).total_seconds()


def train_judge(config: TestbedBuildConfig, out: Path) -> dict[str, Any]:
    """The judge through `erasure classifier train` (its own run directory, resumable)."""
    from classifiers.commands import train

    overrides: dict[str, Any] = {"out": str(out / "judge"), "resume": True, "data_dir": config.data_dir,
                                 "seed": config.seed}
    if config.judge_epochs:
        overrides["epochs"] = config.judge_epochs
    if config.train_limit:
        overrides["train_limit"] = config.train_limit
    judge = load_config(TrainConfig, config.judge_config, overrides)
    if finished_manifest(judge.out) is None:
        train(judge)
    return finished_manifest(judge.out)  # type: ignore[return-value]


def train_vae(config: TestbedBuildConfig, data: ImageSet, run: RunDir) -> dict[str, Any]:
    """Pixel MSE + a small KL on 16 px images; saves the VAE to `run/model`."""
    torch.manual_seed(config.seed)
    vae = build_vae()
    settings = LoopSettings(config.vae_steps, config.vae_lr, config.vae_warmup, config.grad_clip,
                            config.checkpoint_every, cosine=config.vae_cosine)
    loop = DiffusionLoop(vae, settings, run, make_accelerator(), name="vae")

    def loss_at(model: nn.Module, step: int) -> Tensor:
        x, _ = take(data, config.vae_batch_size, step, config.seed, VAE_STREAM, flip=True)
        posterior = model.encode(x).latent_dist
        z = posterior.sample(generator=stream_generator(config.seed, LATENT_STREAM, step))
        kl = posterior.kl().mean() / z[0].numel()
        return nn.functional.mse_loss(model.decode(z).sample, x) + config.vae_kl_weight * kl

    stats = loop.run_steps(loss_at)
    with atomic_dir(run.path / "model") as tmp:
        loop.unwrapped.save_pretrained(tmp)
    return stats


def encode_latents(data: ImageSet, vae: AutoencoderKL, run: RunDir, batch_size: int = 500) -> dict[str, Any]:
    """Every image's posterior mean and std, and the scaling factor that gives the means unit variance."""
    means, stds = [], []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data.images[i:i + batch_size].float().div(127.5).sub(1.0)
            posterior = vae.encode(x).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
    mean = torch.cat(means)
    scaling = 1.0 / float(mean.std())
    with atomic_path(run.path / LATENTS_FILE) as tmp:
        save_file({"mean": mean.contiguous(), "std": torch.cat(stds).contiguous(), "labels": data.labels}, str(tmp))
    return {"images": len(data), "scaling_factor": scaling}


def caption_table(tokenizer: Any) -> tuple[Tensor, list[list[list[int]]], Tensor]:
    """(token ids of every caption, [class][name] -> its caption rows, the empty prompt's ids), padded as the
    pipeline pads prompts."""
    texts, rows = [], []
    for cls in CLASSES:
        rows.append([])
        for name in SYNONYMS[cls]:
            rows[-1].append(list(range(len(texts), len(texts) + len(TRAIN_TEMPLATES))))
            texts.extend(caption(template, name) for template in TRAIN_TEMPLATES)

    def ids(prompts: list[str]) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                         return_tensors="pt").input_ids

    return ids(texts), rows, ids([""])[0]


def draw_captions(labels: Tensor, rows: list[list[list[int]]], generator: torch.Generator) -> Tensor:
    """A caption row per label: the class's own name half the time, else any of its names; any train template."""
    u = torch.rand(len(labels), 3, generator=generator)
    picked = []
    for label, (keep, name_u, template_u) in zip(labels.tolist(), u.tolist(), strict=True):
        names = rows[label]
        name = 0 if keep < 0.5 else int(name_u * len(names))
        picked.append(names[name][int(template_u * len(names[name]))])
    return torch.tensor(picked)


def train_unet(config: TestbedBuildConfig, out: Path, run: RunDir) -> dict[str, Any]:
    """UNet + text encoder on the cached latents (noised with their posterior std, flipped, scaled); EMA saved."""
    latents = load_file(str(out / "latents" / LATENTS_FILE))
    scaling = finished_manifest(out / "latents")["metrics"]["scaling_factor"]  # type: ignore[index]
    tokenizer = build_tokenizer(run.path / "tokenizer")
    table, rows, empty = caption_table(tokenizer)
    torch.manual_seed(config.seed)
    denoiser = Denoiser(build_unet(config.width, config.text_width), build_text_encoder(tokenizer, config.text_width))
    settings = LoopSettings(config.steps, config.lr, config.warmup, config.grad_clip, config.checkpoint_every,
                            config.ema_decay)
    loop = DiffusionLoop(denoiser, settings, run, make_accelerator(), name="unet")
    scheduler = training_scheduler()
    excluded = torch.tensor([CLASSES.index(name) for name in config.exclude], dtype=latents["labels"].dtype)
    kept = torch.nonzero(~torch.isin(latents["labels"], excluded)).flatten()

    def loss_at(model: nn.Module, step: int) -> Tensor:
        index = kept[epoch_batch(len(kept), config.batch_size, step, config.seed, DATA_STREAM)]
        noise = torch.randn(latents["mean"][index].shape, generator=stream_generator(config.seed, LATENT_STREAM, step))
        z = (latents["mean"][index] + latents["std"][index] * noise) * scaling
        mirror = torch.rand(len(index), generator=stream_generator(config.seed, FLIP_STREAM, step)) < 0.5
        z = torch.where(mirror[:, None, None, None], z.flip(3), z)
        generator = stream_generator(config.seed, CAPTION_STREAM, step)
        ids = table[draw_captions(latents["labels"][index], rows, generator)]
        drop = torch.rand(len(index), generator=generator) < config.caption_dropout
        ids = torch.where(drop[:, None], empty, ids)
        return diffusion_loss(lambda x_t, t, c: model(x_t, t, c), scheduler, z, ids,
                              stream_generator(config.seed, NOISE_STREAM, step))

    stats = loop.run_steps(loss_at)
    final = loop.unwrapped
    loop.ema.copy_to(final)  # type: ignore[union-attr]
    vae = AutoencoderKL.from_pretrained(out / "vae" / "model")
    vae.register_to_config(scaling_factor=scaling)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=final.text_encoder, tokenizer=tokenizer, unet=final.unet,
                                   scheduler=sampling_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    with atomic_dir(out / PIPELINE_DIR) as tmp:
        pipe.save_pretrained(tmp)
    return {"unet_parameters": sum(p.numel() for p in final.unet.parameters()), "excluded": list(config.exclude),
            "training_latents": len(kept),
            "text_encoder_parameters": sum(p.numel() for p in final.text_encoder.parameters()),
            "samples_per_second": round((stats["steps_per_second"] or 0) * config.batch_size, 2), **stats}


def build(config: TestbedBuildConfig) -> dict[str, Any]:
    """Run every unfinished stage; print one JSON line with each stage's seconds and the pipeline's path."""
    torch.set_num_threads(config.threads)
    started = time.perf_counter()
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume)
    run.start(to_dict(config), seed=config.seed, device="cpu", kind="testbed-build")
    out = run.path
    if config.reuse is not None:
        for stage in ("judge", "vae", "latents"):
            if not (out / stage).exists():
                shutil.copytree(Path(config.reuse) / stage, out / stage)
    manifests = {"judge": train_judge(config, out)}
    data = training_images(config)
    manifests["vae"] = _stage(out, "vae", config, lambda r: train_vae(config, data, r))
    manifests["latents"] = _stage(out, "latents", config, lambda r: encode_latents(
        data, AutoencoderKL.from_pretrained(out / "vae" / "model"), r))
    manifests["unet"] = _stage(out, "unet", config, lambda r: train_unet(config, out, r))
    summary = {f"{name}_seconds": _elapsed(manifests[name]) for name in STAGES}
    summary.update(judge_test_acc=manifests["judge"]["metrics"]["test_acc"],
                   pipeline=str(out / PIPELINE_DIR), this_run_seconds=round(time.perf_counter() - started, 1))
    run.finish(summary)
    print(json.dumps(summary))
    return summary
