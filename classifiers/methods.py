"""Classifier unlearning methods: each says only what its loss is and which data it reads.

The shared loop (`classifiers.loop.fit`) draws the batches, applies the saliency mask, clips,
steps and checkpoints. A method that restricts itself to salient weights sets `uses_mask`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classifiers.config import OptimConfig, UnlearnConfig
from classifiers.data import ImageSet
from classifiers.models import to_input


@dataclass
class StepBatch:
    """What one optimisation step sees. Images are floats in [0, 1]."""

    forget: tuple[Tensor, Tensor] | None
    forget_random_labels: Tensor | None
    retain: tuple[Tensor, Tensor] | None
    progress: float


class Method:
    """Base of all methods: the data a method reads, an optional one-off edit, and its training loss."""

    name: ClassVar[str]
    uses_forget: ClassVar[bool] = False
    uses_retain: ClassVar[bool] = False
    uses_mask: ClassVar[bool] = False
    from_scratch: ClassVar[bool] = False
    trains: ClassVar[bool] = True

    def __init__(self, config: OptimConfig):
        self.config = config

    def cross_entropy(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=self.config.label_smoothing)

    def edit(self, model: nn.Module, forget: ImageSet, retain: ImageSet) -> None:
        """A one-off change to the weights before training (none by default)."""

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        """The scalar this method minimises at one step (one-shot methods have none)."""
        raise TypeError(f"method '{self.name}' is a one-shot edit and has no training loss")


class FineTune(Method):
    """`ft`: keep training on the retain set only (catastrophic forgetting does the rest)."""

    name = "ft"
    uses_retain = True

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        return self.cross_entropy(model, *batch.retain)


class Retrain(FineTune):
    """`retrain`: train from scratch on the retain set, with the original model's recipe."""

    name = "retrain"
    from_scratch = True


class GradientAscent(Method):
    """`ga`: maximise the loss on the forget set."""

    name = "ga"
    uses_forget = True

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        return -self.cross_entropy(model, *batch.forget)


class RandomLabel(Method):
    """`rl`: fit the forget set to random wrong labels while fitting the retain set to its own."""

    name = "rl"
    uses_forget = True
    uses_retain = True

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        x_forget, _ = batch.forget
        forget_loss = self.cross_entropy(model, x_forget, batch.forget_random_labels)
        return forget_loss + self.cross_entropy(model, *batch.retain)


class SalUn(RandomLabel):
    """`salun`: random-label unlearning restricted to the salient weights (the saliency mask)."""

    name = "salun"
    uses_mask = True


class L1Sparse(FineTune):
    """`l1_sparse`: fine-tune on retain with an L1 penalty on the weights, decayed linearly to zero."""

    name = "l1_sparse"

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        assert isinstance(self.config, UnlearnConfig)
        alpha = self.config.l1_alpha * (1.0 - batch.progress)
        penalty = torch.stack([p.abs().sum() for p in model.parameters() if p.requires_grad]).sum()
        return super().loss(model, batch) + alpha * penalty


class InfluenceUnlearning(Method):
    """`iu`: one Newton step that removes the forget set's influence, with a WoodFisher inverse Hessian.

    theta += alpha * F^-1 (g_forget - g_retain) where g are mean gradients weighted by each set's share
    of the training data, and F = damping * I + (1/N) sum_i g_i g_i^T is the empirical Fisher of N retain
    samples, inverted exactly through the Woodbury identity (an N x N solve, never a d x d matrix).
    """

    name = "iu"
    trains = False

    def edit(self, model: nn.Module, forget: ImageSet, retain: ImageSet) -> None:
        assert isinstance(self.config, UnlearnConfig)
        params = [p for p in model.parameters() if p.requires_grad]
        was_training = model.training
        model.eval()
        total = len(forget) + len(retain)
        g_forget = _mean_gradient(model, params, forget, self.config.batch_size) * (len(forget) / total)
        g_retain = _mean_gradient(model, params, retain, self.config.batch_size) * (len(forget) / total)
        generator = torch.Generator().manual_seed(self.config.seed)
        chosen = torch.randperm(len(retain), generator=generator)[:self.config.iu_samples]
        per_sample = torch.stack([_mean_gradient(model, params, retain.subset(chosen[i:i + 1]), 1)
                                  for i in range(len(chosen))])
        step = woodfisher_solve(per_sample, g_forget - g_retain, self.config.iu_damping)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) + self.config.iu_alpha * step.to(params[0].dtype), params)
        model.train(was_training)


def _mean_gradient(model: nn.Module, params: list[nn.Parameter], data: ImageSet, batch_size: int) -> Tensor:
    """The gradient of the mean cross-entropy over `data`, flattened."""
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, len(data), batch_size):
        x, y = to_input(data.images[i:i + batch_size]), data.labels[i:i + batch_size]
        loss = F.cross_entropy(model(x), y, reduction="sum") / len(data)
        for acc, g in zip(total, torch.autograd.grad(loss, params)):
            acc.add_(g)
    return torch.cat([t.flatten() for t in total]).double()


def woodfisher_solve(per_sample: Tensor, v: Tensor, damping: float) -> Tensor:
    """(damping * I + G^T G / N)^-1 v for the N x d matrix G of per-sample gradients (Woodbury identity)."""
    n = per_sample.shape[0]
    gram = per_sample @ per_sample.T + n * damping * torch.eye(n, dtype=per_sample.dtype, device=per_sample.device)
    coefficients = torch.linalg.solve(gram, per_sample @ v)
    return (v - per_sample.T @ coefficients) / damping


METHODS: dict[str, type[Method]] = {m.name: m for m in (FineTune, GradientAscent, RandomLabel, L1Sparse, SalUn,
                                                        InfluenceUnlearning, Retrain)}


def build_method(config: OptimConfig, name: str) -> Method:
    """The method called `name`, configured by `config`."""
    return METHODS[name](config)


def forget_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The forget loss of the saliency mask: cross-entropy on the forget set (SalUn)."""
    x, y = batch
    return F.cross_entropy(model(x), y)
