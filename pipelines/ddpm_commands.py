"""Handlers of `erasure ddpm {train,unlearn}`, `erasure eval ddpm` and the DDPM side of `erasure sample`."""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from erasure.accel import make_accelerator
from erasure.config import from_dict, to_dict
from erasure.datasets import ImageSet, load_cifar10
from erasure.errors import ConfigError
from erasure.io import MANIFEST, RunDir, finished_run, read_json
from erasure.media import image_grid, save_png
from erasure.saliency import Mask, compute_mask
from erasure.streams import register_streams, stream_generator
from erasure.trainer import tracker_options
from erasure.training import evaluating
from pipelines.config import SampleConfig
from pipelines.ddpm import (
    DATA_STREAM,
    DROPOUT_STREAM,
    LABEL_STREAM,
    NOISE_STREAM,
    NULL_CLASS,
    DiffusionLoop,
    LoopSettings,
    build_scheduler,
    build_unet,
    drop_labels,
    load_model,
    other_labels,
    parameter_count,
    predictor,
    sample_batched,
    save_model,
    take,
)
from pipelines.ddpm_config import (
    CIFAR10_CLASSES,
    DDPMEvalConfig,
    DDPMTrainConfig,
    DDPMUnlearnConfig,
    class_index,
)
from pipelines.methods import DDPM_METHODS
from pipelines.methods.base import Chunk, Draw, TrainedMethod
from pipelines.model_card import ddpm_card
from pipelines.objectives import diffusion_loss, guided_diffusion_loss, noised, sampling_window, squared_error

MASK_FILE = "mask.safetensors"
GRID_FILE = "grid/grid.png"
(FORGET_STREAM, RETAIN_STREAM, MASK_STREAM, PROBE_STREAM, RETAIN_DROPOUT_STREAM, ANCHOR_STREAM,
 PROBE_ANCHOR_STREAM) = register_streams("ddpm", "forget", "retain", "mask", "probe", "retain_dropout", "anchor",
                                         "probe_anchor")
DDPM_KINDS = ("ddpm-train", "ddpm-unlearn")
PROBE_BATCHES = 4


def training_images(config: DDPMTrainConfig, exclude: int | None = None) -> ImageSet:
    """All 50,000 CIFAR-10 training images (the classifier's train + validation splits) at the config's
    resolution, limited to `train_limit` and without class `exclude`."""
    data = load_cifar10(config.data_dir, resolution=config.resolution)
    images = ImageSet(torch.cat([data.train.images, data.val.images]), torch.cat([data.train.labels, data.val.labels]))
    if config.train_limit:
        images = images.subset(torch.arange(min(config.train_limit, len(images))))
    if exclude is not None:
        images = images.subset(images.labels != exclude)
    return images


def _stream(stream: int, accelerator: Any) -> int:
    """A per-process stream id, so processes draw different noise for their different images."""
    return stream + 100 * accelerator.process_index


# ---------------------------------------------------------------------------- train


def train(config: DDPMTrainConfig, accelerator: Any = None) -> dict[str, Any]:
    """Train a class-conditional DDPM with EMA; saves the EMA UNet and the scheduler in diffusers format."""
    accelerator = accelerator or make_accelerator(**tracker_options(config.log_with, config.out))
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume, main_process=accelerator.is_main_process)
    exclude = class_index(config.exclude, "exclude") if config.exclude is not None else None
    data = training_images(config, exclude).to(accelerator.device)
    run.start(to_dict(config), seed=config.seed, device=str(accelerator.device), kind="ddpm-train")
    torch.manual_seed(config.seed)
    unet, scheduler = build_unet(config.preset, config.resolution), build_scheduler()
    settings = LoopSettings(config.steps, config.lr, config.warmup, config.grad_clip, config.checkpoint_every,
                            config.ema_decay)
    loop = DiffusionLoop(unet, settings, run, accelerator)

    def loss_at(model: nn.Module, step: int) -> Tensor:
        x0, labels = take(data, config.batch_size, step, config.seed, DATA_STREAM, flip=config.flip,
                          accelerator=accelerator)
        labels = drop_labels(labels, config.label_dropout, stream_generator(config.seed, DROPOUT_STREAM, step))
        noise = stream_generator(config.seed, _stream(NOISE_STREAM, accelerator), step)
        return diffusion_loss(predictor(model), scheduler, x0, labels, noise)

    stats = loop.run_steps(loss_at)
    metrics = {"preset": config.preset, "parameters": parameter_count(loop.unwrapped), "images": len(data),
               "excluded_class": CIFAR10_CLASSES[exclude] if exclude is not None else None,
               "samples_per_second": round(stats["steps_per_second"] * config.batch_size, 2)
               if stats["steps_per_second"] else None, **stats}
    if accelerator.is_main_process:
        final = loop.unwrapped
        loop.ema.copy_to(final)
        save_model(run.path, final, scheduler)
        run.finish(metrics)
        print(f"trained DDPM '{config.preset}' ({metrics['parameters'] / 1e6:.1f}M parameters) for {config.steps} "
              f"steps in {stats['train_seconds']:.1f}s -> {run.path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


# ---------------------------------------------------------------------------- unlearn


Batch = tuple[Tensor, Tensor, int]
"""(x0 in [-1, 1], labels, index): the index seeds the batch's noise."""


def _batches(data: ImageSet, batch_size: int, count: int, seed: int, stream: int) -> Iterator[Batch]:
    """`count` (x0, labels, index) batches of one stream, without flips (for the mask and the probe)."""
    for index in range(count):
        x0, labels = take(data, batch_size, index, seed, stream, flip=False)
        yield x0, labels, index


Images = tuple[Tensor, Tensor]
"""(x0 in [-1, 1], labels) of one batch of an image set."""


class DDPMSession:
    """The `Session` (pipelines.methods.base) a method sees on one DDPM batch: the batch's forget images (and
    anchor images, of the remap class, for methods that read them), conditions as class labels, the reference's
    antithetic timesteps and summed diffusion loss, and, in training, label dropout to the null class in every
    trained forward (the reference model's train-mode `cond_drop_prob`), drawn from one generator per batch in
    call order. The concept of every row is the forgotten class; `base` is the frozen model of ESD's targets."""

    reduction = "sum"
    concepts = 1

    def __init__(self, config: DDPMUnlearnConfig, scheduler: Any, model: nn.Module, batch: Batch,
                 train_mode: bool, anchor: Images | None = None, base: nn.Module | None = None) -> None:
        self.config, self.scheduler, self.batch, self.anchor = config, scheduler, batch, anchor
        self.model, self.base = model, base
        self.latent_shape = tuple(batch[0].shape[1:])
        self.predict = _training_predictor(model, config, stream_generator(config.seed, DROPOUT_STREAM, batch[2]),
                                           train_mode)

    def images(self, name: str, draw: Draw) -> tuple[Tensor, Tensor]:
        x0 = {"forget": self.batch[0], "anchor": self.anchor[0] if self.anchor is not None else None}[name]
        return x0, torch.full((x0.shape[0],), self.config.forget_class, device=x0.device)

    def condition(self, role: str, labels: Tensor) -> Tensor:
        if role == "forget":
            return labels
        if role == "other":
            return other_labels(labels, stream_generator(self.config.seed, LABEL_STREAM, self.batch[2]))
        return torch.full_like(labels, {"target": self.config.remap_class, "null": NULL_CLASS}[role])

    def noised(self, x0: Tensor, draw: Draw) -> tuple[Tensor, Tensor, Tensor]:
        return noised(self.scheduler, x0, draw.noise, antithetic=self.config.antithetic)

    def current(self, x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        with torch.no_grad():
            return self.predict(x_t, t, condition)

    def frozen(self, x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
        with torch.no_grad():
            return predictor(self.base)(x_t, t, condition)

    def concept_of_step(self, draw: Draw, count: int) -> Tensor:
        return torch.full((count,), self.config.forget_class, device=self.batch[0].device)

    def sample(self, noise: Tensor, condition: Tensor, *, steps: int, window: tuple[int, int], guidance: float,
               base: bool = False) -> Tensor:
        model = self.base if base else self.model
        condition = condition.to(self.batch[0].device)
        return sampling_window(predictor(model), self.scheduler, noise.to(condition.device), condition,
                           torch.full_like(condition, NULL_CLASS), steps=steps, window=window, guidance=guidance)

    def loss(self, chunk: Chunk) -> Tensor:
        """The chunk's weighted squared error, the prediction made with this batch's label dropout."""
        return chunk.weight * squared_error(self.predict(chunk.x_t, chunk.t, chunk.condition), chunk.target,
                                            chunk.reduction)


def build_method(config: DDPMUnlearnConfig) -> TrainedMethod:
    """The configured method with its own settings (its config section, or its defaults)."""
    spec = DDPM_METHODS[config.method]
    return spec.build(getattr(config, spec.section_name, None) or spec.settings())


def forget_objective(config: DDPMUnlearnConfig, scheduler: Any, *, train_mode: bool = True,
                     base: nn.Module | None = None) -> Callable[..., Tensor]:
    """The method's forget term as `loss(model, (x0, labels, index), anchor=None)`, with noise seeded by
    (seed, index).

    The method (pipelines.methods) makes the chunk; the DDPM session gives it the SalUn DDPM reference's
    conventions (see `DDPMSession`); `train_mode=False` (the before/after probe) drops no labels.
    """
    method = build_method(config)

    def loss(model: nn.Module, batch: Batch, anchor: Images | None = None) -> Tensor:
        x0, _, index = batch
        session = DDPMSession(config, scheduler, model, batch, train_mode, anchor, base)
        draw = Draw(index, stream_generator(config.seed, NOISE_STREAM, index), slice(None), x0.shape[0],
                    FORGET_STREAM)
        return session.loss(method.forget_chunk(session, draw))

    return loss


def _training_predictor(model: nn.Module, config: DDPMUnlearnConfig, generator: torch.Generator,
                        train_mode: bool) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """`predict` whose every call drops labels to the null class at `config.label_dropout` (train mode only)."""
    if not train_mode or not config.label_dropout:
        return predictor(model)
    rate = config.label_dropout
    return lambda x_t, t, labels: model(x_t, t, class_labels=drop_labels(labels, rate, generator)).sample


def retain_objective(config: DDPMUnlearnConfig, scheduler: Any) -> Callable[[nn.Module, Batch], Tensor]:
    """The retain term: the ordinary diffusion loss summed per sample (the reference's `remain_loss`, so that
    `alpha` means what the reference's alpha means), with the reference's antithetic timesteps and label dropout."""
    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x0, labels, index = batch
        predict = _training_predictor(model, config, stream_generator(config.seed, RETAIN_DROPOUT_STREAM, index),
                                      True)
        return diffusion_loss(predict, scheduler, x0, labels, stream_generator(config.seed, RETAIN_STREAM, index),
                              reduction="sum", antithetic=config.antithetic)

    return loss


def _saliency_mask(config: DDPMUnlearnConfig, unet: nn.Module, forget: ImageSet, scheduler: Any,
                   accelerator: Any) -> Mask:
    """SalUn's DDPM mask (for any method), as the reference's `generate_mask`: in eval mode, the guided prediction
    (1 + w) eps(x_t, c) - w eps(x_t, null) with w = `mask_guidance` (2), its squared error summed per sample,
    each batch's gradient clipped to norm 1, summed over the forget set (every batch unless `mask_batches`),
    then |.| and the global top `mask_ratio`. `mask_guidance: 0` gives the unguided conditional loss."""
    available = math.ceil(len(forget) / config.forget_batch_size)
    count = min(config.mask_batches or available, available)

    def loss(model: nn.Module, batch: Batch) -> Tensor:
        x0, labels, index = batch
        return guided_diffusion_loss(predictor(model), scheduler, x0, labels, torch.full_like(labels, NULL_CLASS),
                                     config.mask_guidance, stream_generator(config.seed, MASK_STREAM, index),
                                     reduction="sum", antithetic=config.antithetic)

    with evaluating(unet):
        mask = compute_mask(unet, _batches(forget, config.forget_batch_size, count, config.seed, MASK_STREAM), loss,
                            ratio=config.mask_ratio, grad_clip=1.0, accelerator=accelerator,
                            loss_name=f"guided_diffusion_loss(w={config.mask_guidance:g}, sum)")
    mask.metadata.update(forget_class=CIFAR10_CLASSES[config.forget_class], source_run=str(config.run),
                         mask_batches=count)
    return mask


def probe_loss(config: DDPMUnlearnConfig, unet: nn.Module, forget: ImageSet, scheduler: Any,
               anchors: ImageSet | None = None, base: nn.Module | None = None) -> float:
    """The forget term on 4 fixed forget batches (same images and noise before and after unlearning; for a
    method that reads anchor images, 4 fixed anchor batches beside them), in eval mode: after training the UNet
    is in train mode, and a preset with dropout would make the probe random."""
    objective = forget_objective(config, scheduler, train_mode=False, base=base)
    batches = _batches(forget, config.forget_batch_size, PROBE_BATCHES, config.seed, PROBE_STREAM)
    anchor_batches = ([(x0, labels) for x0, labels, _ in _batches(anchors, config.forget_batch_size, PROBE_BATCHES,
                                                                   config.seed, PROBE_ANCHOR_STREAM)]
                      if anchors is not None else [None] * PROBE_BATCHES)
    with torch.no_grad(), evaluating(unet):
        return float(torch.stack([objective(unet, b, a).float()
                                  for b, a in zip(batches, anchor_batches, strict=True)]).mean())


def unlearn(config: DDPMUnlearnConfig, accelerator: Any = None) -> dict[str, Any]:
    """Unlearn a class: forget term (remap / ascent / random labels) + alpha * summed diffusion loss on the rest."""
    accelerator = accelerator or make_accelerator(**tracker_options(config.log_with, config.out))
    manifest = finished_run(config.run, "`erasure ddpm train`")
    if manifest.get("kind") != "ddpm-train":
        raise ConfigError(f"'{config.run}' is a {manifest.get('kind')} run; pass the --out of `erasure ddpm train`")
    train_config = from_dict(DDPMTrainConfig, manifest["config"], source=f"'{config.run}/{MANIFEST}'")
    unet, scheduler = load_model(config.run)
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume, main_process=accelerator.is_main_process)
    data = training_images(train_config).to(accelerator.device)
    forget = data.subset(data.labels == config.forget_class)
    retain = data.subset(data.labels != config.forget_class)
    if not len(forget):
        raise ConfigError(f"the training data of '{config.run}' holds no image of class "
                          f"'{CIFAR10_CLASSES[config.forget_class]}'; nothing to forget")
    method = build_method(config)
    anchors = data.subset(data.labels == config.remap_class) if "anchor" in method.images else None
    run.start(to_dict(config), seed=config.seed, device=str(accelerator.device), kind="ddpm-unlearn")
    unet.to(accelerator.device)
    base = copy.deepcopy(unet).requires_grad_(False).eval() if method.needs_frozen else None
    started = time.perf_counter()
    before = probe_loss(config, unet, forget, scheduler, anchors, base)
    mask = _method_mask(config, unet, forget, scheduler, run, accelerator)
    mask_seconds = time.perf_counter() - started
    settings = LoopSettings(config.steps, config.lr, 0, config.grad_clip, config.checkpoint_every,
                            clip_before_mask=True)
    loop = DiffusionLoop(unet, settings, run, accelerator, mask=mask, name=config.method)
    objective, retain_term = forget_objective(config, scheduler, base=base), retain_objective(config, scheduler)

    def loss_at(model: nn.Module, step: int) -> Tensor:
        x_f, y_f = take(forget, config.forget_batch_size, step, config.seed, FORGET_STREAM, flip=train_config.flip,
                        accelerator=accelerator)
        x_r, y_r = take(retain, config.retain_batch_size, step, config.seed, RETAIN_STREAM, flip=train_config.flip,
                        accelerator=accelerator)
        anchor = (take(anchors, config.forget_batch_size, step, config.seed, ANCHOR_STREAM, flip=train_config.flip,
                       accelerator=accelerator) if anchors is not None else None)
        index = step * 1000 + accelerator.process_index
        return objective(model, (x_f, y_f, index), anchor) + config.alpha * retain_term(model, (x_r, y_r, index))

    stats = loop.run_steps(loss_at)
    unet = loop.unwrapped
    after = probe_loss(config, unet, forget, scheduler, anchors, base)
    metrics = {"method": config.method, "forget_class": CIFAR10_CLASSES[config.forget_class],
               "remap_class": CIFAR10_CLASSES[config.remap_class] if DDPM_METHODS[config.method].needs_target
               else None,
               "forget_objective_before": before, "forget_objective_after": after,
               "mask_density": mask.density if mask is not None else None, "mask_seconds": round(mask_seconds, 3),
               "run_seconds": round(time.perf_counter() - started, 3), **stats}
    if accelerator.is_main_process:
        save_model(run.path, unet, scheduler)
        ddpm_card(run.path, str(config.run), metrics)
        run.finish(metrics)
        print(f"unlearned '{metrics['forget_class']}' with {config.method}: forget objective "
              f"{before:.4g} -> {metrics['forget_objective_after']:.4g} in {metrics['run_seconds']:.1f}s -> {run.path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _method_mask(config: DDPMUnlearnConfig, unet: nn.Module, forget: ImageSet, scheduler: Any, run: RunDir,
                 accelerator: Any) -> Mask | None:
    """The saliency mask when `mask_ratio` is set (salun's default; any method may take one), reloaded from the run
    directory on resume; None trains every weight."""
    if config.mask_ratio is None:
        return None
    saved = run.path / MASK_FILE
    if run.resumed and saved.is_file():
        return Mask.load(saved, unet)
    mask = _saliency_mask(config, unet, forget, scheduler, accelerator)
    if accelerator.is_main_process:
        mask.save(saved)
    return mask


# ---------------------------------------------------------------------------- sample and evaluate


def is_ddpm_run(path: str | Path) -> bool:
    """True when `path` holds a manifest of a DDPM train or unlearn run."""
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and read_json(manifest).get("kind") in DDPM_KINDS


def sample_class(config: SampleConfig) -> dict[str, Any]:
    """`erasure sample --run <ddpm run> --class c`: N guided images as PNGs plus a grid in grid/grid.png (a
    subfolder, so the folder holds only samples when `eval fid` or `eval nudity` reads it).

    Image i is seeded with seed + i and written as soon as its batch is done, so `--resume` after an
    interruption generates only the missing images and ends with the same files.
    """
    from PIL import Image

    from erasure.accel import resolve_device, resolve_dtype

    if config.class_name is None:
        raise ConfigError(f"'{config.run}' is a DDPM run: pass --class <name|index> (one of "
                          f"{', '.join(CIFAR10_CLASSES)}) instead of --prompts")
    label = class_index(config.class_name)
    finished_run(config.run, "`erasure ddpm`")
    device = resolve_device(config.device)
    unet, scheduler = load_model(config.run)
    unet.to(device).eval()
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume)
    run.start(to_dict(config), seed=config.seed, device=str(device), kind="sample")
    name = CIFAR10_CLASSES[label]
    paths = [run.path / f"{name}_{i:05d}.png" for i in range(config.n)]
    missing = [i for i, path in enumerate(paths) if not path.is_file()]
    start = time.perf_counter()
    for first in range(0, len(missing), config.batch_size):
        chunk = missing[first:first + config.batch_size]
        images = sample_batched(unet, scheduler, [label] * len(chunk), [config.seed + i for i in chunk],
                                guidance=config.guidance, steps=config.steps, sampler=config.scheduler,
                                batch_size=config.batch_size, dtype=resolve_dtype(config.dtype, device))
        for i, array in zip(chunk, images.permute(0, 2, 3, 1).numpy(), strict=False):
            save_png(paths[i], array)
    seconds = time.perf_counter() - start
    save_png(run.path / GRID_FILE, image_grid([np.asarray(Image.open(p)) for p in paths], columns=8, cell=64))
    metrics = {"images": config.n, "generated": len(missing), "skipped_existing": config.n - len(missing),
               "class": name, "guidance": config.guidance, "generation_seconds": round(seconds, 3),
               "images_per_second": round(len(missing) / seconds, 4) if missing and seconds > 0 else None,
               "scheduler": config.scheduler, "device": str(device)}
    run.finish(metrics)
    return metrics


def evaluate(config: DDPMEvalConfig) -> dict[str, Any]:
    """`erasure eval ddpm`: protocol ddpm-cifar10-v1 (see pipelines.ddpm_eval)."""
    from pipelines.ddpm_eval import evaluate_ddpm

    return evaluate_ddpm(config)
