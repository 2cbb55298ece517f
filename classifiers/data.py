"""Forget sets of the classifier experiments and their batch augmentation.

The datasets themselves (digits, CIFAR-10, ImageSet) are read by `erasure.datasets`, shared with the DDPM.
Every batch is a slice of tensors already on the device; augmentation runs on whole batches, never per
image in Python.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from erasure.config import class_index
from erasure.datasets import Dataset, ImageSet
from erasure.errors import ConfigError


@dataclass
class ForgetSplit:
    """The training split divided into what to forget and what to keep."""

    spec: str
    forget_index: Tensor
    retain_index: Tensor
    forget_class: int | None

    def forget(self, data: Dataset) -> ImageSet:
        return data.train.subset(self.forget_index.to(data.train.labels.device))

    def retain(self, data: Dataset) -> ImageSet:
        return data.train.subset(self.retain_index.to(data.train.labels.device))

    def test(self, data: Dataset) -> ImageSet:
        """Test images that measure generalisation: without the forgotten class in class-wise forgetting."""
        return self.held_out(data.test)

    def held_out(self, images: ImageSet) -> ImageSet:
        """Held-out images (test or validation) that measure generalisation: without the forgotten class
        in class-wise forgetting."""
        if self.forget_class is None:
            return images
        return images.subset(images.labels != self.forget_class)


def forget_split(spec: str, data: Dataset, seed: int = 0) -> ForgetSplit:
    """Parse 'class:<name|index>' or 'random:<fraction>' into forget / retain indices of the train split."""
    kind, _, value = spec.partition(":")
    labels = data.train.labels.cpu()
    if kind == "class":
        cls = class_index(value, data.classes, "the forget spec")
        mask = labels == cls
        return ForgetSplit(spec, mask.nonzero().flatten(), (~mask).nonzero().flatten(), cls)
    if kind == "random":
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not 0 < fraction < 1:
            raise ConfigError(f"forget spec '{spec}': the fraction must be a number in (0, 1), e.g. random:0.1")
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        n_forget = max(1, round(fraction * len(labels)))
        return ForgetSplit(spec, order[:n_forget].sort().values, order[n_forget:].sort().values, None)
    raise ConfigError(f"forget spec '{spec}' must be 'class:<name|index>' or 'random:<fraction>'")


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Random crop with zero padding (an eighth of the size: 4 pixels at 32) and horizontal flip, on a whole batch."""
    n, _, h, w = images.shape
    device = images.device
    pad = max(1, h // 8)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).to(device)
    flip = (torch.rand(n, generator=generator) < 0.5).to(device)
    rows = (dy[:, None] + torch.arange(h, device=device)[None])  # n x h
    cols = (dx[:, None] + torch.arange(w, device=device)[None])  # n x w
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    batch_index = torch.arange(n, device=device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[batch_index, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()
