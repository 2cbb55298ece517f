"""Class-conditional DDPM on CIFAR-10: UNet presets, the one training loop, guided sampling, saving.

The UNet is diffusers' `UNet2DModel` with a class embedding of 11 entries: the 10 CIFAR-10 classes
and a "null" class (index 10) for classifier-free guidance. Every step is a pure function of
(seed, step): its batch, flips, label dropout, timesteps and noise come from generators seeded with
them, so a resumed run ends bit-identical to an uninterrupted one. A run directory holds `unet/`
(diffusers format, EMA weights for a trained model) and `scheduler/` (the DDPM forward process).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DModel
from torch import Tensor, nn

from erasure.datasets import ImageSet
from erasure.errors import ConfigError
from erasure.io import RunDir, atomic_dir
from erasure.saliency import Mask, masked_parameters
from erasure.streams import epoch_batch, register_streams, stream_generator
from erasure.trainer import EMA, Trainer
from pipelines.ddpm_config import CIFAR10_CLASSES
from pipelines.objectives import guided_epsilon
from pipelines.schedulers import scheduler_from

NUM_CLASSES = len(CIFAR10_CLASSES)
NULL_CLASS = NUM_CLASSES
UNET_DIR, SCHEDULER_DIR = "unet", "scheduler"
DATA_STREAM, FLIP_STREAM, DROPOUT_STREAM, NOISE_STREAM, LABEL_STREAM = register_streams(
    "ddpm", "data", "flip", "dropout", "noise", "label")

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
             "down_block_types": ("DownBlock2D", "DownBlock2D"), "up_block_types": ("UpBlock2D", "UpBlock2D")},
    "cpu": {"block_out_channels": (32, 64, 128), "layers_per_block": 1, "norm_num_groups": 16,
            "down_block_types": ("DownBlock2D",) * 3, "up_block_types": ("UpBlock2D",) * 3},
    "fast": {"block_out_channels": (64, 128, 256), "layers_per_block": 2,
             "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
             "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
    "paper": {"block_out_channels": (128, 256, 256, 256), "layers_per_block": 2, "dropout": 0.1,
              "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
              "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")},
}


def build_unet(preset: str, image_size: int = 32) -> UNet2DModel:
    """A freshly initialised class-conditional UNet of `preset` (seed torch first for a reproducible init)."""
    return UNet2DModel(sample_size=image_size, in_channels=3, out_channels=3, num_class_embeds=NUM_CLASSES + 1,
                       **PRESETS[preset])


def build_scheduler() -> DDPMScheduler:
    """The forward process of Ho et al. (1000 steps, linear betas 1e-4 .. 0.02), as the reference uses."""
    return DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")


def predictor(unet: nn.Module) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """`predict(x_t, t, labels) -> eps` over a (possibly wrapped) UNet, for `pipelines.objectives`."""
    return lambda x_t, t, labels: unet(x_t, t, class_labels=labels).sample


# ---------------------------------------------------------------------------- data


def to_model_range(images: Tensor) -> Tensor:
    """uint8 NCHW images to floats in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: Tensor) -> Tensor:
    """Model-range images ([-1, 1]) to uint8 NCHW."""
    return ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)


def take(data: ImageSet, batch_size: int, step: int, seed: int, stream: int, *, flip: bool,
         accelerator: Any = None) -> tuple[Tensor, Tensor]:
    """The `step`-th (x0 in [-1, 1], labels) batch of a stream, this process's share, flipped when asked."""
    index = epoch_batch(len(data), batch_size, step, seed, stream)
    if accelerator is not None:
        index = index[accelerator.process_index::accelerator.num_processes]
    index = index.to(data.labels.device)
    images, labels = data.images[index], data.labels[index]
    if flip:
        mirror = torch.rand(len(index), generator=stream_generator(seed, FLIP_STREAM + 10 * stream, step)) < 0.5
        images = torch.where(mirror.to(images.device)[:, None, None, None], images.flip(3), images)
    return to_model_range(images), labels


def drop_labels(labels: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """Labels with a share `rate` replaced by the null class (classifier-free guidance training)."""
    drop = (torch.rand(len(labels), generator=generator) < rate).to(labels.device)
    return torch.where(drop, torch.full_like(labels, NULL_CLASS), labels)


def other_labels(labels: Tensor, generator: torch.Generator) -> Tensor:
    """A uniformly random different class for every label (random-label unlearning)."""
    shift = torch.randint(1, NUM_CLASSES, (len(labels),), generator=generator).to(labels.device)
    return (labels + shift) % NUM_CLASSES


# ---------------------------------------------------------------------------- the loop


@dataclass
class LoopSettings:
    """What the loop needs besides the model and the loss: schedule, clipping, checkpoints."""

    steps: int
    lr: float
    warmup: int = 0
    grad_clip: float = 0.0
    checkpoint_every: int = 0
    ema_decay: float | None = None
    clip_before_mask: bool = False
    cosine: bool = False
    """After the warm-up, decay the learning rate to zero along a half cosine (else keep it constant)."""

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant or cosine-decayed (a pure function of the step)."""
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if not self.cosine:
            return self.lr
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class DiffusionLoop:
    """One Adam run of `loss_at(model, step)` with optional mask and EMA, on the shared `Trainer`."""

    def __init__(self, unet: UNet2DModel, settings: LoopSettings, run: RunDir, accelerator: Any, *,
                 mask: Mask | None = None, name: str = "train"):
        self.settings = settings
        unet.to(accelerator.device)
        params = masked_parameters(unet, mask) if mask is not None else list(unet.parameters())
        self.ema = EMA(unet, settings.ema_decay) if settings.ema_decay is not None else None
        self.trainer = Trainer(unet, torch.optim.Adam(params, lr=settings.lr), accelerator=accelerator, run=run,
                               steps=settings.steps, lr_at=settings.lr_at, mask=mask, grad_clip=settings.grad_clip,
                               checkpoint_every=settings.checkpoint_every, ema=self.ema, name=name,
                               clip_before_mask=settings.clip_before_mask)

    @property
    def unwrapped(self) -> UNet2DModel:
        return self.trainer.unwrapped

    def run_steps(self, loss_at: Callable[[nn.Module, int], Tensor]) -> dict[str, float]:
        """Train to `settings.steps` (from the last checkpoint when resuming); returns timing and the last loss."""
        return self.trainer.fit(loss_at)


# ---------------------------------------------------------------------------- saving and loading


def save_model(run_dir: str | Path, unet: UNet2DModel, scheduler: Any) -> None:
    """Write `unet/` and `scheduler/` in diffusers format, each atomically (temp dir, then rename)."""
    for name, component in ((UNET_DIR, unet), (SCHEDULER_DIR, scheduler)):
        with atomic_dir(Path(run_dir) / name) as tmp:
            component.save_pretrained(tmp)


def load_model(run_dir: str | Path) -> tuple[UNet2DModel, DDPMScheduler]:
    """The UNet and scheduler of a DDPM run directory."""
    path = Path(run_dir)
    if not (path / UNET_DIR / "config.json").is_file():
        raise ConfigError(f"'{run_dir}' holds no DDPM UNet ({UNET_DIR}/config.json is missing); pass the --out "
                          "folder of a finished `erasure ddpm train` or `erasure ddpm unlearn` run")
    return UNet2DModel.from_pretrained(path / UNET_DIR), DDPMScheduler.from_pretrained(path / SCHEDULER_DIR)


# ---------------------------------------------------------------------------- guided sampling


@torch.no_grad()
def sample(unet: UNet2DModel, scheduler: Any, labels: Sequence[int], seeds: Sequence[int], *, guidance: float,
           steps: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 NCHW images of `labels` with classifier-free guidance (1 + w) eps(x, c) - w eps(x, null).

    Works with any diffusers scheduler (DDIM for speed, DDPM for fidelity). Image i uses its own CPU
    generator seeded with seeds[i] for its initial noise and any sampler noise, so an image does not
    depend on the batch it is in. The scheduler is modified (set_timesteps): pass a private copy.
    """
    device = next(unet.parameters()).device
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    size = unet.config.sample_size
    x = torch.stack([torch.randn((3, size, size), generator=g) for g in generators]).to(device)
    x = x * scheduler.init_noise_sigma
    cond = torch.as_tensor(list(labels), dtype=torch.long, device=device)
    both = torch.cat([cond, torch.full_like(cond, NULL_CLASS)])
    scheduler.set_timesteps(steps)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
        with autocast:
            eps = unet(model_input, t, class_labels=both).sample.float()
        conditional, unconditional = eps.chunk(2)
        x = scheduler.step(guided_epsilon(conditional, unconditional, guidance), t, x,
                           generator=generators if _takes_generator(scheduler) else None).prev_sample
    return to_uint8(x).cpu()


def _takes_generator(scheduler: Any) -> bool:
    """Whether the scheduler's step draws noise (DDPM, DDIM with eta > 0) and so accepts generators."""
    return "generator" in inspect.signature(scheduler.step).parameters


def make_sampler(scheduler: DDPMScheduler, name: str) -> Any:
    """A fresh scheduler for sampling: 'model' is the run's own DDPM, others are built from its config."""
    if name == "model":
        return DDPMScheduler.from_config(scheduler.config)
    return scheduler_from(name, scheduler.config)


def sample_batched(unet: UNet2DModel, scheduler: DDPMScheduler, labels: Sequence[int], seeds: Sequence[int], *,
                   guidance: float, steps: int, sampler: str, batch_size: int,
                   dtype: torch.dtype = torch.float32) -> Tensor:
    """`sample` in batches of `batch_size` (images are independent of the batching)."""
    out = []
    for start in range(0, len(labels), batch_size):
        out.append(sample(unet, make_sampler(scheduler, sampler), labels[start:start + batch_size],
                          seeds[start:start + batch_size], guidance=guidance, steps=steps, dtype=dtype))
    return torch.cat(out) if out else torch.empty(0, 3, unet.config.sample_size, unet.config.sample_size,
                                                  dtype=torch.uint8)


def parameter_count(model: nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


