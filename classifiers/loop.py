"""The one training loop of the classifier domain, for training, retraining and every unlearning method.

Batches are pure functions of (seed, stream, step): the data order, augmentation and random labels
of step s are the same whether or not the run was interrupted, so a resumed run ends bit-identical
to an uninterrupted one. The steps themselves (mask, clip, checkpoints, resume) run on erasure's Trainer.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from classifiers.config import OptimConfig
from classifiers.data import augment
from classifiers.methods import Method, StepBatch
from classifiers.models import to_input
from erasure.datasets import ImageSet
from erasure.io import RunDir
from erasure.streams import epoch_batch, register_streams, stream_generator
from erasure.trainer import Trainer

FORGET_STREAM, RETAIN_STREAM, LABEL_STREAM, AUGMENT_STREAM = register_streams(
    "classifier", "forget", "retain", "label", "augment")


@dataclass
class Streams:
    """The data a run reads: the forget set, the retain set (either may be absent)."""

    forget: ImageSet | None
    retain: ImageSet | None


def learning_rate(config: OptimConfig, step: int, total: int) -> float:
    """The schedule as a pure function of the step (no scheduler state to save)."""
    progress = step / max(total, 1)
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "linear":
        return config.lr * (1.0 - progress)
    warmup = config.warmup
    if progress < warmup:
        return config.lr * progress / warmup
    rest = (progress - warmup) / (1.0 - warmup)
    if config.schedule == "cosine":
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * rest))
    return config.lr * (1.0 - rest)


def build_optimizer(params: list[nn.Parameter], config: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW as configured."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                           nesterov=config.nesterov and config.momentum > 0)


class Loop:
    """One run of a method over its streams, with checkpoints in `run.checkpoints`."""

    def __init__(self, model: nn.Module, method: Method, streams: Streams, config: OptimConfig, run: RunDir, *,
                 num_classes: int, augment_images: bool, accelerator, mask=None, forget_batch_size: int | None = None):
        self.method, self.streams, self.config, self.run = method, streams, config, run
        self.num_classes, self.augment_images = num_classes, augment_images
        self.accelerator = accelerator
        self.forget_batch_size = forget_batch_size or config.batch_size
        primary_set = streams.retain if method.uses_retain else streams.forget
        if primary_set is None or len(primary_set) == 0:
            needed = "retain" if method.uses_retain else "forget"
            raise ValueError(f"method '{method.name}' needs a non-empty {needed} set")
        self.alternating = method.sequential_passes
        self.forget_steps = math.ceil(len(streams.forget) / config.batch_size) if self.alternating else 0
        self.steps_per_epoch = self.forget_steps + math.ceil(len(primary_set) / config.batch_size)
        self.total_steps = self.steps_per_epoch * config.epochs
        params = [p for p in model.parameters() if p.requires_grad]
        if mask is not None:
            from erasure.saliency import masked_parameters

            params = masked_parameters(model, mask)
        optimizer = build_optimizer(params, config)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.trainer = Trainer(torch.compile(model) if config.compile else model, optimizer, accelerator=accelerator,
                               run=run, steps=self.total_steps, lr_at=self.lr_at, mask=mask,
                               grad_clip=config.grad_clip, checkpoint_every=config.checkpoint_every,
                               samples_per_step=config.batch_size, name=f"'{method.name}'")

    @property
    def unwrapped(self) -> nn.Module:
        return self.trainer.unwrapped

    def lr_at(self, step: int) -> float:
        """The configured schedule at `step`."""
        return learning_rate(self.config, step, self.total_steps)

    def _images(self, images: Tensor, step: int) -> Tensor:
        if self.augment_images:
            generator = stream_generator(self.config.seed, AUGMENT_STREAM, step)
            images = augment(images, generator)
        x = to_input(images)
        return x.contiguous(memory_format=torch.channels_last) if self.config.channels_last else x

    def _take(self, data: ImageSet, stream: int, batch_size: int, step: int) -> tuple[Tensor, Tensor]:
        index = epoch_batch(len(data), batch_size, step, self.config.seed, stream)
        index = index[self.accelerator.process_index::self.accelerator.num_processes].to(data.labels.device)
        return self._images(data.images[index], step * 2 + stream), data.labels[index]

    def batch(self, step: int) -> StepBatch:
        """The batch of global step `step` (a pure function of the seed and the step)."""
        if self.alternating:
            return self._pass_batch(step)
        forget = retain = random_labels = None
        if self.method.uses_forget:
            size = self.forget_batch_size if self.method.uses_retain else self.config.batch_size
            forget = self._take(self.streams.forget, FORGET_STREAM, size, step)
            generator = stream_generator(self.config.seed, LABEL_STREAM, step)
            shift = torch.randint(1, self.num_classes, (len(forget[1]),), generator=generator).to(forget[1].device)
            random_labels = (forget[1] + shift) % self.num_classes
        if self.method.uses_retain:
            retain = self._take(self.streams.retain, RETAIN_STREAM, self.config.batch_size, step)
        return StepBatch(forget, random_labels, retain, progress=step / self.total_steps,
                         epoch=step // self.steps_per_epoch)

    def _pass_batch(self, step: int) -> StepBatch:
        """The SalUn reference's epoch: a pass over the forget set with labels drawn uniformly from all classes
        (the true one included), then a pass over the retain set; one of the two per step."""
        epoch, position = divmod(step, self.steps_per_epoch)
        progress = step / self.total_steps
        size = self.config.batch_size
        if position < self.forget_steps:
            forget = self._take(self.streams.forget, FORGET_STREAM, size, epoch * self.forget_steps + position)
            generator = stream_generator(self.config.seed, LABEL_STREAM, step)
            labels = torch.randint(0, self.num_classes, (len(forget[1]),), generator=generator).to(forget[1].device)
            return StepBatch(forget, labels, None, progress, epoch)
        retain_steps = self.steps_per_epoch - self.forget_steps
        index = epoch * retain_steps + position - self.forget_steps
        retain = self._take(self.streams.retain, RETAIN_STREAM, size, index)
        return StepBatch(None, None, retain, progress, epoch)

    def run_steps(self, stop_when: Callable[[nn.Module], bool] | None = None, check_every: int = 1) -> dict[str, float]:
        """Train to the end (or from the last checkpoint); returns steps, seconds and the last loss.

        `stop_when(model)`, checked every `check_every` steps, ends training early (e.g. once the
        forget accuracy reached a target); it depends on the weights only, so resume stays exact.
        """
        def stop_after(step: int) -> bool:
            return stop_when is not None and (step + 1) % check_every == 0 and stop_when(self.unwrapped)

        return self.trainer.fit(lambda model, step: self.method.loss(model, self.batch(step)), stop_after)
