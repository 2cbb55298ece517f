"""Stable Diffusion concept erasure under Accelerate: components, image sets and their latents, the saliency mask,
any registered method (pipelines/methods): trained ones by the shared `Trainer` (masked step, checkpoints,
resume), closed-form edits in one call; saving.

The order follows diffusers' text-to-image example: the Accelerator first, frozen VAE and text encoder in
the weight dtype on the device, only the UNet and its optimizer prepared (by the Trainer, which runs the
micro-steps under `accelerator.accumulate`), unwrap before saving on the main process. Under FSDP2 the UNet is
prepared (sharded) alone first, so the mask pass and the optimizer see only shards, and the full weights are
gathered before saving. Every micro-step's
images, timesteps and noise are pure functions of (seed, micro-step) over the *global* batch, and each rank
keeps rows rank::world of it, so N processes compute what one process does and a resumed run is
bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from diffusers import StableDiffusionPipeline
from torch import Tensor

from erasure.accel import check_fsdp, fsdp_version, make_accelerator
from erasure.config import to_dict
from erasure.errors import ConfigError, RunDirError
from erasure.io import RunDir, atomic_dir
from erasure.media import image_grid, list_images, save_png
from erasure.optimizers import make_optimizer
from erasure.prompts import Prompt
from erasure.saliency import Mask, compute_mask, masked_parameters
from erasure.streams import endless_batch, register_streams, stream_generator
from erasure.trainer import Trainer
from erasure.training import evaluating
from pipelines.delta import export_delta
from pipelines.families import EDITABLE, denoiser, denoiser_name, family_of, text_conditioning
from pipelines.loading import load_base_pipeline, model_family
from pipelines.methods import SD_METHODS
from pipelines.methods.base import IMAGE_SETS, Chunk, Draw
from pipelines.model_card import sd_card
from pipelines.objectives import guided_diffusion_loss, noised_rows, sampling_window, squared_error, training_scheduler
from pipelines.sampling import generate_batch, sampling_context
from pipelines.sd_config import SDEraseConfig
from pipelines.sd_data import ImageSet, generate_set, plan, prompt_texts, read_set

(FORGET_STREAM, RETAIN_STREAM, NOISE_STREAM, MASK_STREAM, EVAL_STREAM, POSTERIOR_STREAM, MASK_POSTERIOR_STREAM,
 ANCHOR_STREAM) = register_streams("sd", "forget", "retain", "noise", "mask", "eval", "posterior", "mask_posterior",
                                   "anchor")
EVAL_DRAWS = 8
"""Fixed draws of the before/after forget objective of a method that reads no images (ESD's sampled x_t)."""
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
    """Text embeddings (float32): each concept's forget and target prompts (K, L, D), the empty prompt (1, L, D)
    and the retain prompts (P, L, D)."""

    forget: Tensor
    target: Tensor
    null: Tensor
    retain: Tensor


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    """The dtype of the frozen parts: bf16/fp16 under that mixed precision, else float32."""
    return WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)


def load_components(config: SDEraseConfig, accelerator: Accelerator) -> StableDiffusionPipeline:
    """The base pipeline on the device: denoiser (UNet, or SD3's transformer) float32 (trained), VAE and text
    encoders frozen in the weight dtype."""
    pipe = load_base_pipeline(config.model, accelerator.device, torch.float32)
    dtype = weight_dtype(accelerator)
    for frozen in (pipe.vae, *text_conditioning(pipe).text_encoders):
        frozen.requires_grad_(False)
        if dtype != torch.float32:
            frozen.to(dtype=dtype)
    denoiser(pipe).train()
    if config.gradient_checkpointing:
        denoiser(pipe).enable_gradient_checkpointing()
    return pipe


def encode_images(pipe: StableDiffusionPipeline, images: np.ndarray, batch_size: int) -> tuple[Tensor, Tensor]:
    """float32 VAE posterior means and standard deviations of uint8 RGB images, shifted and scaled as the denoiser
    reads latents ((z - shift_factor) x scaling_factor; SD3's VAE has a shift, SD's none)."""
    vae = pipe.vae
    means, stds = [], []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            posterior = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    scale, shift = vae.config.scaling_factor, vae.config.get("shift_factor") or 0.0
    return (torch.cat(means) - shift) * scale, torch.cat(stds) * scale


def set_texts(config: SDEraseConfig, pairs: list[tuple[str, str]]) -> dict[str, list[str]]:
    """The prompts each image set is generated from: forget and anchor (target) prompts by concept, retain
    prompts with the preserve prompts."""
    return {"forget": [forget for forget, _ in pairs], "anchor": [target for _, target in pairs],
            "retain": list(dict.fromkeys([*prompt_texts(config.retain_prompts), *config.preserve]))}


def build_sets(config: SDEraseConfig, texts: dict[str, list[str]], names: tuple[str, ...],
               pipe: StableDiffusionPipeline, run: RunDir, accelerator: Accelerator) -> dict[str, ImageSet]:
    """The image sets `names`: the user's folders, else generated by the base model on the main process into
    <run>/data/<name> (reused when already there). Set i's image j gets seed seed + i * num_images + j."""
    folders = {"forget": config.forget_images, "retain": config.retain_images, "anchor": None}
    for name in names:
        if folders[name] is None:
            folders[name] = str(run.path / "data" / name)
            if accelerator.is_main_process:
                offset = IMAGE_SETS.index(name) * config.num_images
                prompts = plan(texts[name], config.num_images, config.seed + offset, config.generation_guidance)
                with accelerator.autocast():
                    generate_set(pipe, Path(folders[name]), prompts, resolution=config.resolution,
                                 steps=config.generation_steps, batch_size=config.generation_batch_size)
    accelerator.wait_for_everyone()
    return {name: read_set(folders[name], texts[name], config.resolution) for name in names}


def to_latents(pipe: StableDiffusionPipeline, images: ImageSet, prompts: list[str], batch_size: int) -> Latents:
    """Latents of a set, each pointing at its prompt in `prompts` (unknown prompts are appended)."""
    for text in images.prompts:
        if text not in prompts:
            prompts.append(text)
    index = torch.tensor([prompts.index(text) for text in images.prompts], device=pipe.vae.device)
    return Latents(*encode_images(pipe, images.images, batch_size), index)


def concept_latents(pipe: StableDiffusionPipeline, images: ImageSet, name: str, prompts: list[str],
                    batch_size: int) -> Latents:
    """Latents of a forget or anchor set, each pointing at its concept; with one concept every image belongs to
    it, with several an image whose prompt is none of the concepts' is refused."""
    known = list(dict.fromkeys(prompts))
    if len(known) > 1:
        stray = next((text for text in images.prompts if text not in known), None)
        if stray is not None:
            raise ConfigError(f"a {name} image's prompt '{stray}' is none of the concepts' {name} prompts; with "
                              "several concepts every image needs a prompts.jsonl record naming its concept")
        index = [prompts.index(text) for text in images.prompts]
    else:
        index = [0] * len(images)
    latents = Latents(*encode_images(pipe, images.images, batch_size), torch.tensor(index))
    latents.prompt = latents.prompt.to(latents.x0.device)
    return latents


def build_method(config: SDEraseConfig) -> Any:
    """The configured method's implementation, built from its settings section."""
    spec = SD_METHODS[config.method]
    return spec.build(getattr(config, spec.section_name, None) or spec.settings())


def image_sets(config: SDEraseConfig, method: Any) -> tuple[str, ...]:
    """The sets a trained run reads: the method's, retain when it has a retain term, forget when a mask is made."""
    names = set(method.images)
    if method.retain_term and config.alpha > 0:
        names.add("retain")
    if config.mask_ratio is not None and config.mask is None:
        names.add("forget")
    return tuple(name for name in IMAGE_SETS if name in names)


def encode_sets(config: SDEraseConfig, pairs: list[tuple[str, str]], names: tuple[str, ...],
                pipe: StableDiffusionPipeline, run: RunDir, accelerator: Accelerator) -> tuple[dict[str, Latents],
                                                                                                Conditions]:
    """The latents of image sets `names` and the text embeddings the objectives use."""
    texts = set_texts(config, pairs)
    images = build_sets(config, texts, names, pipe, run, accelerator)
    retain_prompts: list[str] = []
    sets = {name: (to_latents(pipe, images[name], retain_prompts, config.batch_size) if name == "retain"
                   else concept_latents(pipe, images[name], name, texts[name], config.batch_size))
            for name in names}
    embeddings = text_conditioning(pipe, config.resolution).encode([*texts["forget"], *texts["anchor"], "",
                                                                     *retain_prompts])
    k = len(pairs)
    return sets, Conditions(embeddings[:k], embeddings[k:2 * k], embeddings[2 * k:2 * k + 1], embeddings[2 * k + 1:])


class Eraser:
    """One trained erasure run: the method's chunks, the mask, and the `Trainer` that runs them. It is the
    `Session` a trained method sees (pipelines.methods.base)."""

    reduction = "mean"

    def __init__(self, config: SDEraseConfig, pipe: StableDiffusionPipeline, accelerator: Accelerator,
                 run: RunDir, sets: dict[str, Latents], conditions: Conditions) -> None:
        self.config, self.pipe, self.accelerator, self.run = config, pipe, accelerator, run
        self.sets, self.conditions = sets, conditions
        self.spec, self.method = SD_METHODS[config.method], build_method(config)
        self.predictor = text_conditioning(pipe, config.resolution).predictor
        self.concepts = conditions.forget.shape[0]
        self.scheduler = training_scheduler(pipe.scheduler)
        size = config.resolution // pipe.vae_scale_factor
        self.latent_shape = (pipe.vae.config.latent_channels, size, size)
        self.base = self._frozen_copy() if self.method.needs_frozen else None
        self.mask: Mask | None = None
        self.unet: torch.nn.Module = denoiser(pipe)
        self.trainer: Trainer | None = None

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.unet)

    def _frozen_copy(self) -> torch.nn.Module:
        """The base denoiser, frozen in the weight dtype (ESD's and CA's targets come from it)."""
        frozen = copy.deepcopy(denoiser(self.pipe)).requires_grad_(False).eval()
        dtype = weight_dtype(self.accelerator)
        return frozen if dtype == torch.float32 else frozen.to(dtype=dtype)

    # ---------------------------------------------------------------- the Session of pipelines.methods

    def images(self, name: str, draw: Draw) -> tuple[Tensor, Tensor]:
        latents = self.sets[name]
        stream = {"forget": FORGET_STREAM, "anchor": ANCHOR_STREAM, "retain": RETAIN_STREAM}[name]
        index = endless_batch(len(latents), draw.total, draw.step, self.config.seed,
                              EVAL_STREAM if draw.stream == EVAL_STREAM else stream)[draw.rows]
        index = index.to(latents.x0.device)
        return latents.draw(index, draw.posterior, draw.rows, draw.total), latents.prompt[index]

    def condition(self, role: str, concept: Tensor) -> Tensor:
        if role == "other":
            raise ConfigError(f"method {self.config.method} needs class labels; Stable Diffusion has prompts")
        if role == "null":
            return self.conditions.null.expand(concept.shape[0], -1, -1)
        table = {"forget": self.conditions.forget, "target": self.conditions.target}[role]
        return table[concept.to(table.device)]

    def noised(self, x0: Tensor, draw: Draw) -> tuple[Tensor, Tensor, Tensor]:
        return noised_rows(self.scheduler, x0, draw.noise, draw.rows, draw.total)

    def current(self, x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        with torch.no_grad():
            return self.predictor(self.unwrapped)(x_t, t, condition)

    def frozen(self, x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        with torch.no_grad():
            dtype = next(self.base.parameters()).dtype
            return self.predictor(self.base)(x_t.to(dtype), t, condition.to(dtype)).float()

    def concept_of_step(self, draw: Draw, count: int) -> Tensor:
        return torch.randint(self.concepts, (count,), generator=draw.noise)

    def sample(self, noise: Tensor, condition: Tensor, *, steps: int, window: tuple[int, int], guidance: float,
               base: bool = False) -> Tensor:
        predict = self.frozen if base else self.predictor(self.unwrapped)
        return sampling_window(predict, self.pipe.scheduler, noise.to(condition.device),
                           condition, self.condition("null", torch.zeros(noise.shape[0], dtype=torch.long)),
                           steps=steps, window=window, guidance=guidance)

    # ---------------------------------------------------------------- objective

    def retain_chunk(self, draw: Draw) -> Chunk:
        """The retain rows: the ordinary diffusion loss on retain latents with their prompts, weight alpha."""
        x0, prompt = self.images("retain", draw)
        x_t, target, t = self.noised(x0, draw)
        return Chunk(x_t, t, self.conditions.retain[prompt], target, self.config.alpha)

    def chunks_loss(self, model: torch.nn.Module, chunks: list[Chunk]) -> Tensor:
        """One UNet forward over all chunks' rows; the weighted sum of each chunk's MSE."""
        out = self.predictor(model)(torch.cat([c.x_t for c in chunks]), torch.cat([c.t for c in chunks]),
                               torch.cat([c.condition for c in chunks]))
        parts = out.split([c.x_t.shape[0] for c in chunks])
        return sum(c.weight * squared_error(o, c.target, c.reduction) for c, o in zip(chunks, parts, strict=True))

    def step_loss(self, step: int, micro: int = 0) -> Tensor:
        """This rank's loss on its share of micro-step `micro` of optimizer step `step`.

        The global batch of a step (and its noise) is split into world x accumulation shards: rank r
        takes rows micro * world + r, stepping by world * accumulation, so any process count and any
        accumulation give the same step up to float summation order."""
        world, size, seed = self.accelerator.num_processes, self.config.batch_size, self.config.seed
        shards = world * self.config.gradient_accumulation_steps
        rows = slice(micro * world + self.accelerator.process_index, None, shards)
        draw = Draw(step, stream_generator(seed, NOISE_STREAM, step), rows, size, FORGET_STREAM,
                    self._posterior_generator(POSTERIOR_STREAM, step))
        chunks = [self.method.forget_chunk(self, draw)]
        if self.method.retain_term and self.config.alpha > 0:
            chunks.append(self.retain_chunk(draw))
        with self.accelerator.autocast():
            return self.chunks_loss(self.unet, chunks)

    def loss_at(self, model: torch.nn.Module, step: int, micro: int = 0) -> Tensor:
        """The Trainer's `loss_at`: `step_loss` (which runs the prepared UNet, the Trainer's `model`)."""
        return self.step_loss(step, micro)

    def _posterior_generator(self, stream: int, index: int) -> torch.Generator | None:
        """The generator of the VAE posterior samples of one batch, or None when training on posterior means."""
        return stream_generator(self.config.seed, stream, index) if self.config.posterior == "sample" else None

    def forget_objective(self) -> float:
        """The method's forget term on fixed draws (the same images and noise before and after), in eval mode
        (the UNet trains in train mode; a UNet with dropout would otherwise make the two values random): one
        draw of a batch per batch of the forget set, or EVAL_DRAWS draws for a method that reads no images."""
        size = self.config.batch_size
        count = -(-len(self.sets["forget"]) // size) if "forget" in self.method.images else EVAL_DRAWS
        values = []
        with evaluating(self.unwrapped):
            for index in range(count):
                draw = Draw(index, stream_generator(self.config.seed, EVAL_STREAM, index), slice(None), size,
                            EVAL_STREAM, None)
                chunk = self.method.forget_chunk(self, draw)
                with torch.no_grad(), self.accelerator.autocast():
                    values.append(float(self.chunks_loss(self.unwrapped, [chunk])))
        return sum(values) / count

    # ---------------------------------------------------------------- mask

    def build_mask(self) -> Mask | None:
        """Reuse --mask (or the run's own mask on resume), else compute one when a ratio is set, else None."""
        own = self.run.path / MASK_FILE
        path = self.config.mask or (own if self.run.resumed and own.is_file() else None)
        if path is not None:
            return Mask.load(path, denoiser(self.pipe))
        if self.config.mask_ratio is None:
            return None
        size, forget = self.config.batch_size, self.sets["forget"]
        batches = [{"index": i, "rows": torch.arange(start, min(start + size, len(forget)))}
                   for i, start in enumerate(range(0, len(forget), size))]
        mask = compute_mask(denoiser(self.pipe), batches, self._mask_loss, ratio=self.config.mask_ratio,
                            params=self.method.scope.includes, accelerator=self.accelerator,
                            loss_name=f"guided diffusion loss (w={self.config.mask_guidance})",
                            progress=self.accelerator.is_main_process)
        mask.metadata.update(base_model=self.config.model, forget_prompt=self.config.forget_prompt,
                             scope=self.method.scope.name)
        return mask

    def _mask_loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> Tensor:
        """SalUn's SD mask loss: MSE((1 + w) eps(x_t, c) - w eps(x_t, null), noise) on forget latents, each with
        its concept's prompt."""
        forget = self.sets["forget"]
        x0 = forget.draw(batch["rows"], self._posterior_generator(MASK_POSTERIOR_STREAM, batch["index"]))
        condition = self.condition("forget", forget.prompt[batch["rows"].to(forget.prompt.device)])
        null = self.conditions.null.expand_as(condition)
        noise = stream_generator(self.config.seed, MASK_STREAM, batch["index"])
        with self.accelerator.autocast():
            return guided_diffusion_loss(self.predictor(model), self.scheduler, x0, condition, null,
                                         self.config.mask_guidance, noise)

    # ---------------------------------------------------------------- loop

    def prepare(self) -> None:
        """The method's scope trainable; under FSDP2 the UNet (and a frozen copy) sharded first, in place, so
        neither the mask pass nor the optimizer ever holds a whole weight or gradient; the mask; the optimizer over
        the scope's masked parameters; and the Trainer (which prepares both, protecting the unmasked weights)."""
        unet, config, scope = denoiser(self.pipe), self.config, self.method.scope.includes
        if not any(scope(name) for name, _ in unet.named_parameters()):
            raise ConfigError(f"method {config.method} trains {self.method.scope.name}, which this "
                              f"{denoiser_name(self.pipe)} does not have; pick another method or parameter scope")
        for name, p in unet.named_parameters():
            p.requires_grad_(scope(name))
        if fsdp_version(self.accelerator) == 2:
            self.accelerator.prepare(unet)
            if self.base is not None:  # ESD's frozen copy, sharded the same way but outside the training state
                from accelerate.utils import fsdp2_prepare_model

                self.base = fsdp2_prepare_model(self.accelerator, self.base)
        self.mask = self.build_mask()
        allowed = {id(p) for p in masked_parameters(unet, self.mask)} if self.mask is not None else None
        params = [p for name, p in unet.named_parameters()
                  if scope(name) and (allowed is None or id(p) in allowed)]
        if not params:
            raise ConfigError(f"the mask keeps no weight of {self.method.scope.name}, which method {config.method} "
                              "trains; pass a mask computed for this scope or drop --mask")
        optimizer = make_optimizer(config.optimizer, params, lr=config.lr, weight_decay=config.weight_decay)
        self.trainer = Trainer(unet, optimizer, accelerator=self.accelerator, run=self.run,
                               steps=config.total_steps(len(self.sets.get("forget", ())) or config.num_images),
                               lr_at=lambda _: config.lr, mask=self.mask, grad_clip=config.grad_clip,
                               checkpoint_every=config.checkpoint_every, samples_per_step=config.batch_size,
                               name=f"'{config.method}'", accumulation=config.gradient_accumulation_steps)
        self.unet = self.trainer.model

    def sharding(self) -> dict[str, Any] | None:
        """Under FSDP2: the version and how many shard groups the denoiser and the frozen copy (if any) hold."""
        version = fsdp_version(self.accelerator)
        if version is None:
            return None
        from torch.distributed.fsdp import FSDPModule

        groups = {name: sum(isinstance(m, FSDPModule) for m in model.modules())
                  for name, model in (("denoiser", self.unwrapped), ("frozen_copy", self.base)) if model is not None}
        return {"version": version, "shard_groups": groups}

    def trained_denoiser(self) -> torch.nn.Module:
        """The trained denoiser as an ordinary module: the unwrapped one, or under FSDP (Accelerate's FSDP2 config,
        whose parameters are shards) a fresh copy holding the gathered full weights on the main process. Call it on
        every rank: gathering is a collective."""
        if fsdp_version(self.accelerator) is None:
            return self.unwrapped
        state = self.accelerator.get_state_dict(self.unet)
        model = type(self.unwrapped).from_config(self.unwrapped.config)
        if self.accelerator.is_main_process:
            model.load_state_dict(state)
        return model.to(self.accelerator.device)

    def train(self) -> dict[str, Any]:
        """Run the optimizer steps (from the last checkpoint when resuming); returns timing and the last loss."""
        stats = self.trainer.fit(self.loss_at)
        rate = stats["steps_per_second"]
        return {**stats, "train_samples_per_second": round(rate * self.config.batch_size, 3) if rate else None}


def grid_prompts(config: SDEraseConfig, pairs: list[tuple[str, str]]) -> list[Prompt]:
    """A row per concept's forget prompt and up to three retain or preserve prompts, `grid_seeds` seeds each."""
    texts = list(dict.fromkeys([*(forget for forget, _ in pairs), *config.preserve,
                                *prompt_texts(config.retain_prompts)]))[:len(pairs) + 3]
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
    """Run `erasure sd`: the method's edit, or sets -> mask -> masked training; then unet/, mask, delta, grid,
    metrics."""
    pairs = config.concept_pairs()
    prompt_texts(config.retain_prompts)  # a missing prompt file fails now, before the model loads
    for folder in (config.forget_images, config.retain_images):
        if folder is not None:
            list_images(folder)
    spec = SD_METHODS[config.method]
    family = model_family(config.model)
    if not spec.trains and family not in EDITABLE:
        raise ConfigError(f"method {config.method} edits cross-attention in closed form and {family.upper()}'s joint "
                          "attention has none; pick a trained method (e.g. --method esd-x, which trains the text "
                          "key/value projections of its joint attention)")
    accelerator = accelerator or make_accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    if spec.trains:
        check_fsdp(accelerator)
    shards = accelerator.num_processes * config.gradient_accumulation_steps
    if spec.trains and config.batch_size % shards:
        raise ConfigError(f"batch_size {config.batch_size} must be a multiple of processes x "
                          f"gradient_accumulation_steps = {shards} (each micro-step takes an equal share)")
    run = open_run(config, accelerator)
    pipe = load_components(config, accelerator)
    if config.mask is not None:  # a corrupt or foreign --mask fails now, not after minutes of generation
        Mask.load(config.mask, denoiser(pipe))
    run.start(to_dict(config), seed=config.seed, device=str(accelerator.device), kind="sd-erase")
    prompts = grid_prompts(config, pairs) if config.grid_seeds else []
    before = render(pipe, prompts, config, accelerator) if accelerator.is_main_process and prompts else []
    base_state = ({k: v.detach().cpu().clone() for k, v in denoiser(pipe).state_dict().items()}
                  if config.export_delta and accelerator.is_main_process else None)
    metrics = {"method": config.method, "family": family_of(pipe),
               "concepts": [{"forget": f, "target": t} for f, t in pairs],
               "preserve": list(config.preserve), "processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision}
    mask = None
    if spec.trains:
        names = image_sets(config, build_method(config))
        eraser = Eraser(config, pipe, accelerator, run, *encode_sets(config, pairs, names, pipe, run, accelerator))
        objective_before = eraser.forget_objective()
        eraser.prepare()
        stats = eraser.train()
        accelerator.wait_for_everyone()
        unet, mask = eraser.trained_denoiser().eval(), eraser.mask
        metrics.update(forget_objective_before=objective_before, forget_objective_after=eraser.forget_objective(),
                       images={name: len(latents) for name, latents in eraser.sets.items()},
                       scope=eraser.method.scope.name, fsdp=eraser.sharding(), **stats)
    else:
        started = time.perf_counter()
        method = build_method(config)
        metrics.update(method.edit(pipe, pairs, list(config.preserve)), scope=method.scope.name,
                       edit_seconds=round(time.perf_counter() - started, 3))
        unet = denoiser(pipe).eval()
    if accelerator.is_main_process:
        with atomic_dir(run.path / denoiser_name(pipe)) as tmp:
            unet.save_pretrained(tmp)
        if mask is not None:
            mask.save(run.path / MASK_FILE)
            metrics["mask"] = mask.summary()
        if base_state is not None:
            metrics["delta"] = export_delta(base_state, unet, run.path / DELTA_FILE, base_model=config.model)
        if prompts:
            setattr(pipe, denoiser_name(pipe), unet)
            save_before_after(run.path / GRID_FILE, before, render(pipe, prompts, config, accelerator),
                              config.grid_seeds)
        sd_card(run.path, to_dict(config), spec.source, metrics, type(pipe).__name__, denoiser_name(pipe),
                type(unet).__name__)
        run.finish(metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics
