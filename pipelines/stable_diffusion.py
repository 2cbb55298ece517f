"""Stable Diffusion concept erasure under Accelerate: components, forget/retain latents, the saliency mask,
the salun / esd / ga objectives trained by the shared `Trainer` (masked step, checkpoints, resume), saving.

The order follows diffusers' text-to-image example: the Accelerator first, frozen VAE and text encoder in
the weight dtype on the device, only the UNet and its optimizer prepared (by the Trainer, which runs the
micro-steps under `accelerator.accumulate`), unwrap before saving on the main process. Every micro-step's
images, timesteps and noise are pure functions of (seed, micro-step) over the *global* batch, and each rank
keeps rows rank::world of it, so N processes compute what one process does and a resumed run is
bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from torch import Tensor

from erasure.accel import make_accelerator
from erasure.config import to_dict
from erasure.errors import ConfigError, RunDirError
from erasure.io import RunDir, atomic_dir
from erasure.media import image_grid, list_images, save_png
from erasure.prompts import Prompt
from erasure.saliency import Mask, compute_mask, masked_parameters
from erasure.streams import endless_batch, register_streams, stream_generator
from erasure.trainer import Trainer
from erasure.training import evaluating
from pipelines.delta import export_delta
from pipelines.loading import load_base_pipeline
from pipelines.objectives import Predict, esd_target, guided_diffusion_loss, noised_rows
from pipelines.sampling import generate_batch, sampling_context
from pipelines.sd_config import SDEraseConfig
from pipelines.sd_data import ImageSet, generate_set, plan, prompt_texts, read_set

(FORGET_STREAM, RETAIN_STREAM, NOISE_STREAM, MASK_STREAM, EVAL_STREAM, POSTERIOR_STREAM,
 MASK_POSTERIOR_STREAM) = register_streams("sd", "forget", "retain", "noise", "mask", "eval", "posterior",
                                           "mask_posterior")
MASK_FILE = "mask.safetensors"
DELTA_FILE = "delta.safetensors"
GRID_FILE = "samples/before_after.png"
WEIGHT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Latents:
    """Scaled VAE posterior means and standard deviations (float32, on the device) and, per latent, the index of
    its prompt embedding."""

    x0: Tensor
    std: Tensor
    prompt: Tensor

    def __len__(self) -> int:
        return self.x0.shape[0]

    def draw(self, index: Tensor, generator: torch.Generator | None, rows: slice = slice(None),
             total: int | None = None) -> Tensor:
        """Latents `index`: posterior samples mean + std * e (e from `generator`, drawn for a global batch of
        `total` and cut to `rows`, as `noised_rows` draws its noise), or the posterior means when no generator."""
        mean = self.x0[index]
        if generator is None:
            return mean
        shape = (total if total is not None else mean.shape[0], *mean.shape[1:])
        e = torch.randn(shape, generator=generator, dtype=torch.float32)[rows].to(mean.device)
        return mean + self.std[index] * e


@dataclass
class Conditions:
    """Text embeddings (float32): forget, remap and empty prompts (1, L, D), retain prompts (P, L, D)."""

    forget: Tensor
    remap: Tensor
    null: Tensor
    retain: Tensor


@dataclass
class Chunk:
    """Rows of one UNet forward pass, with the target and loss weight of their MSE."""

    x_t: Tensor
    t: Tensor
    condition: Tensor
    target: Tensor
    weight: float


def predictor(unet: torch.nn.Module) -> Predict:
    """`predict(x_t, t, text_embedding) -> eps` for a UNet2DConditionModel (wrapped or not)."""
    return lambda x_t, t, condition: unet(x_t, t, encoder_hidden_states=condition).sample


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen parts: bf16/fp16 under that mixed precision, else float32."""
    return WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)


def load_components(config: SDEraseConfig, accelerator: Accelerator) -> StableDiffusionPipeline:
    """The base pipeline on the device: UNet float32 (trained), VAE and text encoder frozen in the weight dtype."""
    pipe = load_base_pipeline(config.model, accelerator.device, torch.float32)
    dtype = weight_dtype(accelerator)
    for frozen in (pipe.vae, pipe.text_encoder):
        frozen.requires_grad_(False)
        if dtype != torch.float32:
            frozen.to(dtype=dtype)
    pipe.unet.train()
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    return pipe


def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str]) -> Tensor:
    """float32 CLIP embeddings (P, L, D) of `prompts`."""
    tokens = pipe.tokenizer(prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(tokens.input_ids.to(pipe.text_encoder.device))[0].float()


def encode_images(pipe: StableDiffusionPipeline, images: np.ndarray, batch_size: int) -> tuple[Tensor, Tensor]:
    """float32 scaled VAE posterior means and standard deviations of uint8 RGB images."""
    vae = pipe.vae
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    scale = vae.config.scaling_factor
    return torch.cat(means) * scale, torch.cat(stds) * scale


def build_sets(config: SDEraseConfig, retain_texts: list[str], pipe: StableDiffusionPipeline, run: RunDir,
               accelerator: Accelerator) -> tuple[ImageSet, ImageSet]:
    """The forget and retain images: the user's folders, else generated by the base model on the main
    process into <run>/data/{forget,retain} (reused when already there)."""
    folders = {"forget": config.forget_images, "retain": config.retain_images}
    texts = {"forget": [config.forget_prompt], "retain": retain_texts}
    for offset, name in enumerate(folders):
        if folders[name] is None:
            folders[name] = str(run.path / "data" / name)
            if accelerator.is_main_process:
                prompts = plan(texts[name], config.num_images, config.seed + offset * config.num_images,
                               config.generation_guidance)
                with accelerator.autocast():
                    generate_set(pipe, Path(folders[name]), prompts, resolution=config.resolution,
                                 steps=config.generation_steps, batch_size=config.generation_batch_size)
    accelerator.wait_for_everyone()
    return tuple(read_set(folders[name], texts[name], config.resolution) for name in folders)


def to_latents(pipe: StableDiffusionPipeline, images: ImageSet, prompts: list[str], batch_size: int) -> Latents:
    """Latents of a set, each pointing at its prompt in `prompts` (unknown prompts are appended)."""
    for text in images.prompts:
        if text not in prompts:
            prompts.append(text)
    index = torch.tensor([prompts.index(text) for text in images.prompts], device=pipe.unet.device)
    return Latents(*encode_images(pipe, images.images, batch_size), index)


def encode_sets(config: SDEraseConfig, retain_texts: list[str], pipe: StableDiffusionPipeline, run: RunDir,
                accelerator: Accelerator) -> tuple[Latents, Latents, Conditions]:
    """Forget and retain latents and the text embeddings the objectives use."""
    forget_images, retain_images = build_sets(config, retain_texts, pipe, run, accelerator)
    retain_prompts: list[str] = []
    forget = to_latents(pipe, forget_images, [config.forget_prompt], config.batch_size)
    retain = to_latents(pipe, retain_images, retain_prompts, config.batch_size)
    embeddings = encode_prompts(pipe, [config.forget_prompt, config.salun.remap_prompt or "", "", *retain_prompts])
    return forget, retain, Conditions(embeddings[0:1], embeddings[1:2], embeddings[2:3], embeddings[3:])


class Eraser:
    """One erasure run: the method's chunks, the mask, and the `Trainer` that runs them."""

    def __init__(self, config: SDEraseConfig, pipe: StableDiffusionPipeline, accelerator: Accelerator,
                 run: RunDir, forget: Latents, retain: Latents, conditions: Conditions) -> None:
        self.config, self.pipe, self.accelerator, self.run = config, pipe, accelerator, run
        self.forget, self.retain, self.conditions = forget, retain, conditions
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.frozen = self._frozen_copy() if config.method == "esd" else None
        self.mask: Mask | None = None
        self.unet: torch.nn.Module = pipe.unet
        self.trainer: Trainer | None = None

    @property
    def unwrapped(self) -> UNet2DConditionModel:
        return self.accelerator.unwrap_model(self.unet)

    def _frozen_copy(self) -> UNet2DConditionModel:
        """The base UNet, frozen in the weight dtype (ESD's target comes from it)."""
        frozen = copy.deepcopy(self.pipe.unet).requires_grad_(False).eval()
        dtype = weight_dtype(self.accelerator)
        return frozen if dtype == torch.float32 else frozen.to(dtype=dtype)

    # ---------------------------------------------------------------- objective

    def forget_chunk(self, x0: Tensor, gen: torch.Generator, rows: slice, total: int) -> Chunk:
        """The forget rows of a forward pass under the configured method."""
        x_t, diffusion_target, t = noised_rows(self.scheduler, x0, gen, rows, total)
        c = self.conditions
        forget = c.forget.expand(x0.shape[0], -1, -1)
        if self.config.method == "ga":
            return Chunk(x_t, t, forget, diffusion_target, -1.0)
        if self.config.method == "esd":
            target = esd_target(predictor(self.frozen), x_t, t, forget, c.null.expand_as(forget),
                                self.config.esd.guidance)
            return Chunk(x_t, t, forget, target, 1.0)
        with torch.no_grad():
            target = predictor(self.unwrapped)(x_t, t, c.remap.expand_as(forget))
        return Chunk(x_t, t, forget, target, 1.0)

    def retain_chunk(self, x0: Tensor, index: Tensor, gen: torch.Generator, rows: slice, total: int) -> Chunk:
        """The retain rows: the ordinary diffusion loss on retain latents `x0` with their prompts, weight alpha."""
        x_t, target, t = noised_rows(self.scheduler, x0, gen, rows, total)
        return Chunk(x_t, t, self.conditions.retain[self.retain.prompt[index]], target, self.config.alpha)

    def chunks_loss(self, model: torch.nn.Module, chunks: list[Chunk]) -> Tensor:
        """One UNet forward over all chunks' rows; the weighted sum of each chunk's MSE."""
        out = predictor(model)(torch.cat([c.x_t for c in chunks]), torch.cat([c.t for c in chunks]),
                               torch.cat([c.condition for c in chunks]))
        parts = out.split([c.x_t.shape[0] for c in chunks])
        return sum(c.weight * F.mse_loss(o.float(), c.target.float()) for c, o in zip(chunks, parts, strict=False))

    def step_loss(self, step: int, micro: int = 0) -> Tensor:
        """This rank's loss on its share of micro-step `micro` of optimizer step `step`.

        The global batch of a step (and its noise) is split into world x accumulation shards: rank r
        takes rows micro * world + r, stepping by world * accumulation, so any process count and any
        accumulation give the same step up to float summation order."""
        world, size, seed = self.accelerator.num_processes, self.config.batch_size, self.config.seed
        shards = world * self.config.gradient_accumulation_steps
        rows = slice(micro * world + self.accelerator.process_index, None, shards)
        gen = stream_generator(seed, NOISE_STREAM, step)
        posterior = self._posterior_generator(POSTERIOR_STREAM, step)
        forget_index = endless_batch(len(self.forget), size, step, seed, FORGET_STREAM)[rows]
        x0 = self.forget.draw(forget_index.to(self.forget.x0.device), posterior, rows, size)
        chunks = [self.forget_chunk(x0, gen, rows, size)]
        if self.config.method == "salun" and self.config.alpha > 0:
            retain_index = endless_batch(len(self.retain), size, step, seed, RETAIN_STREAM)[rows]
            retain_index = retain_index.to(self.retain.x0.device)
            x0 = self.retain.draw(retain_index, posterior, rows, size)
            chunks.append(self.retain_chunk(x0, retain_index, gen, rows, size))
        with self.accelerator.autocast():
            return self.chunks_loss(self.unet, chunks)

    def loss_at(self, model: torch.nn.Module, step: int, micro: int = 0) -> Tensor:
        """The Trainer's `loss_at`: `step_loss` (which runs the prepared UNet, the Trainer's `model`)."""
        return self.step_loss(step, micro)

    def _posterior_generator(self, stream: int, index: int) -> torch.Generator | None:
        """The generator of the VAE posterior samples of one batch, or None when training on posterior means."""
        return stream_generator(self.config.seed, stream, index) if self.config.posterior == "sample" else None

    def forget_objective(self) -> float:
        """The method's forget term over the whole forget set with fixed noise (for before/after), in eval mode
        (the UNet trains in train mode; a UNet with dropout would otherwise make the two values random)."""
        gen, total, size = stream_generator(self.config.seed, EVAL_STREAM, 0), len(self.forget), self.config.batch_size
        values = []
        with evaluating(self.unwrapped):
            for start in range(0, total, size):
                x0 = self.forget.x0[start:start + size]
                chunk = self.forget_chunk(x0, gen, slice(None), x0.shape[0])
                with torch.no_grad(), self.accelerator.autocast():
                    values.append(float(self.chunks_loss(self.unwrapped, [chunk])) * x0.shape[0])
        return sum(values) / total

    # ---------------------------------------------------------------- mask

    def build_mask(self) -> Mask | None:
        """Reuse --mask (or the run's own mask on resume), else compute one when a ratio is set, else None."""
        own = self.run.path / MASK_FILE
        path = self.config.mask or (own if self.run.resumed and own.is_file() else None)
        if path is not None:
            return Mask.load(path, self.pipe.unet)
        if self.config.mask_ratio is None:
            return None
        size = self.config.batch_size
        batches = [{"index": i, "x0": self.forget.draw(torch.arange(start, min(start + size, len(self.forget))),
                                                       self._posterior_generator(MASK_POSTERIOR_STREAM, i))}
                   for i, start in enumerate(range(0, len(self.forget), size))]
        mask = compute_mask(self.pipe.unet, batches, self._mask_loss, ratio=self.config.mask_ratio,
                            accelerator=self.accelerator,
                            loss_name=f"guided diffusion loss (w={self.config.mask_guidance})",
                            progress=self.accelerator.is_main_process)
        mask.metadata.update(base_model=self.config.model, forget_prompt=self.config.forget_prompt)
        return mask

    def _mask_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        """SalUn's SD mask loss: MSE((1 + w) eps(x_t, c) - w eps(x_t, null), noise) on forget latents."""
        x0 = batch["x0"]
        forget = self.conditions.forget.expand(x0.shape[0], -1, -1)
        null = self.conditions.null.expand_as(forget)
        noise = stream_generator(self.config.seed, MASK_STREAM, batch["index"])
        with self.accelerator.autocast():
            return guided_diffusion_loss(predictor(model), self.scheduler, x0, forget, null, self.config.mask_guidance,
                                         noise)

    # ---------------------------------------------------------------- loop

    def prepare(self) -> None:
        """Mask, optimizer over the masked parameters, and the Trainer (which prepares both, protecting the
        unmasked weights)."""
        self.mask = self.build_mask()
        unet, config = self.pipe.unet, self.config
        params = masked_parameters(unet, self.mask) if self.mask is not None else list(unet.parameters())
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.trainer = Trainer(unet, optimizer, accelerator=self.accelerator, run=self.run,
                               steps=config.total_steps(len(self.forget)), lr_at=lambda _: config.lr, mask=self.mask,
                               grad_clip=config.grad_clip, checkpoint_every=config.checkpoint_every,
                               samples_per_step=config.batch_size, name=f"'{config.method}'",
                               accumulation=config.gradient_accumulation_steps)
        self.unet = self.trainer.model

    def train(self) -> dict[str, Any]:
        """Run the optimizer steps (from the last checkpoint when resuming); returns timing and the last loss."""
        stats = self.trainer.fit(self.loss_at)
        rate = stats["steps_per_second"]
        return {**stats, "train_samples_per_second": round(rate * self.config.batch_size, 3) if rate else None}


def grid_prompts(config: SDEraseConfig, retain_texts: list[str]) -> list[Prompt]:
    """The forget prompt and up to three retain prompts, `grid_seeds` seeds each."""
    texts = [config.forget_prompt, *dict.fromkeys(retain_texts)][:4]
    return [Prompt(row=i * config.grid_seeds + s, text=text, seed=config.seed + s,
                   guidance=config.generation_guidance)
            for i, text in enumerate(texts) for s in range(config.grid_seeds)]


def render(pipe: StableDiffusionPipeline, prompts: list[Prompt], config: SDEraseConfig,
           accelerator: Accelerator) -> list[np.ndarray]:
    """Images of `prompts` from the pipeline as it is now."""
    images = []
    with sampling_context(), accelerator.autocast():
        for start in range(0, len(prompts), config.generation_batch_size):
            images += generate_batch(pipe, prompts[start:start + config.generation_batch_size],
                                     height=config.resolution, width=config.resolution, steps=config.generation_steps)
    return images


def save_before_after(path: Path, before: list[np.ndarray], after: list[np.ndarray], columns: int) -> None:
    """A grid with, per prompt, a row of base images and below it a row of erased images."""
    rows = [row for start in range(0, len(before), columns)
            for row in (before[start:start + columns], after[start:start + columns])]
    save_png(path, image_grid([image for row in rows for image in row], columns=columns))


def open_run(config: SDEraseConfig, accelerator: Accelerator) -> RunDir:
    """The run directory, guarded on the main process; a refusal there is raised on every rank (no hang)."""
    run, refusal = None, [None]
    if accelerator.is_main_process:
        try:
            run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume)
        except RunDirError as exc:
            refusal = [str(exc)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise RunDirError(refusal[0])
    if run is None:
        run = RunDir(config.out, resume=config.resume, main_process=False)
        run.resumed = config.resume and (run.path / "manifest.json").is_file()
    return run


def erase(config: SDEraseConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Run `erasure sd`: sets -> mask -> masked training -> unet/, mask, delta, grid, metrics."""
    retain_texts = prompt_texts(config.retain_prompts)
    for folder in (config.forget_images, config.retain_images):
        if folder is not None:
            list_images(folder)
    accelerator = accelerator or make_accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    shards = accelerator.num_processes * config.gradient_accumulation_steps
    if config.batch_size % shards:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of processes x "
                          f"gradient_accumulation_steps = {shards} (each micro-step takes an equal share)")
    run = open_run(config, accelerator)
    pipe = load_components(config, accelerator)
    if config.mask is not None:  # a corrupt or foreign --mask fails now, not after minutes of generation
        Mask.load(config.mask, pipe.unet)
    run.start(to_dict(config), seed=config.seed, device=str(accelerator.device), kind="sd-erase")
    eraser = Eraser(config, pipe, accelerator, run, *encode_sets(config, retain_texts, pipe, run, accelerator))
    prompts = grid_prompts(config, retain_texts) if config.grid_seeds else []
    before = render(pipe, prompts, config, accelerator) if accelerator.is_main_process and prompts else []
    base_state = ({k: v.detach().cpu().clone() for k, v in pipe.unet.state_dict().items()}
                  if config.export_delta and accelerator.is_main_process else None)
    objective_before = eraser.forget_objective()
    eraser.prepare()
    stats = eraser.train()
    accelerator.wait_for_everyone()
    unet = eraser.unwrapped.eval()
    metrics = {"method": config.method, "forget_objective_before": objective_before,
               "forget_objective_after": eraser.forget_objective(), "forget_images": len(eraser.forget),
               "retain_images": len(eraser.retain), "processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision, **stats}
    if accelerator.is_main_process:
        with atomic_dir(run.path / "unet") as tmp:
            unet.save_pretrained(tmp)
        if eraser.mask is not None:
            eraser.mask.save(run.path / MASK_FILE)
            metrics["mask"] = eraser.mask.summary()
        if base_state is not None:
            metrics["delta"] = export_delta(base_state, unet, run.path / DELTA_FILE, base_model=config.model)
        if prompts:
            pipe.unet = unet
            save_before_after(run.path / GRID_FILE, before, render(pipe, prompts, config, accelerator),
                              config.grid_seeds)
        run.finish(metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics
