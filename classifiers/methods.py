"""Classifier unlearning methods: each says only what its loss is and which data it reads.

The shared loop (`classifiers.loop.Loop`) draws the batches, applies the mask, clips, steps and
checkpoints. A method that trains under a mask sets `uses_mask`: the saliency mask of the config,
or the mask its one-off `edit` returns (`kaggle_2nd`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from classifiers import fisher, piggyback
from classifiers.config import OptimConfig, UnlearnSharedConfig
from classifiers.method_settings import METHODS as METHOD_NAMES
from classifiers.method_settings import (
    GradientAscentSettings,
    InfluenceSettings,
    KaggleFirstSettings,
    KaggleSecondSettings,
    L1SparseSettings,
    MethodSettings,
    PiggybackSettings,
    RandomLabelSettings,
    SalUnSettings,
    SSDSettings,
)
from classifiers.models import to_input
from erasure.datasets import ImageSet
from erasure.saliency import Mask, compute_mask
from erasure.streams import register_streams, stream_generator
from erasure.training import evaluating

(REINIT_STREAM,) = register_streams("classifier", "reinit")


@dataclass
class StepBatch:
    """What one optimisation step sees. Images are floats in [0, 1].

    Under sequential passes a step sees either a forget batch or a retain batch, never both.
    """

    forget: tuple[Tensor, Tensor] | None
    forget_random_labels: Tensor | None
    retain: tuple[Tensor, Tensor] | None
    progress: float
    epoch: int = 0


class Method:
    """Base of all methods: the data a method reads, an optional one-off edit, and its training loss."""

    name: ClassVar[str]
    uses_forget: ClassVar[bool] = False
    uses_retain: ClassVar[bool] = False
    uses_mask: ClassVar[bool] = False
    from_scratch: ClassVar[bool] = False
    trains: ClassVar[bool] = True

    settings: MethodSettings

    def __init__(self, config: OptimConfig, settings: MethodSettings | None = None):
        self.config = config
        self.settings = settings if settings is not None else MethodSettings()

    @property
    def sequential_passes(self) -> bool:
        """Whether an epoch is a full forget pass then a full retain pass (else every step reads both sets)."""
        return False

    def optim_config(self, config: OptimConfig) -> OptimConfig:
        """The optimiser settings this method trains with (the configured ones by default)."""
        return config

    def cross_entropy(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(model(x), y, label_smoothing=self.config.label_smoothing)

    def edit(self, model: nn.Module, forget: ImageSet, retain: ImageSet) -> Mask | None:
        """A one-off change to the weights before training (none by default).

        May return a mask it made (saved with the run); a method that `uses_mask` trains under it.
        """
        return None

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
    settings: GradientAscentSettings

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        return -self.cross_entropy(model, *batch.forget)


class RandomLabel(Method):
    """`rl`: fit the forget set to random labels while fitting the retain set to its own.

    `plan: reference` follows OPTML-Group/Unlearn-Saliency (Classification/unlearn/RL.py): each
    epoch a forget pass with labels drawn uniformly from all classes (the true one included), then a
    retain pass, with plain SGD (no Nesterov) at a constant learning rate. `joint` sums a forget batch
    (labels other than the true one) and a retain batch at every step, under the configured optimiser.
    """

    name = "rl"
    uses_forget = True
    uses_retain = True
    settings: RandomLabelSettings

    @property
    def sequential_passes(self) -> bool:
        return self.settings.plan == "reference"

    def optim_config(self, config: OptimConfig) -> OptimConfig:
        if self.sequential_passes:
            return replace(config, nesterov=False, schedule="constant")
        return config

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        terms = []
        if batch.forget is not None:
            terms.append(self.cross_entropy(model, batch.forget[0], batch.forget_random_labels))
        if batch.retain is not None:
            terms.append(self.cross_entropy(model, *batch.retain))
        return sum(terms[1:], terms[0])


class SalUn(RandomLabel):
    """`salun`: random-label unlearning restricted to the salient weights (the saliency mask)."""

    name = "salun"
    uses_mask = True
    settings: SalUnSettings


class L1Sparse(FineTune):
    """`l1_sparse`: fine-tune on retain with an L1 penalty on the weights, decayed linearly to zero by epoch
    (alpha (1 - epoch / epochs), as the reference's FT_l1)."""

    name = "l1_sparse"
    settings: L1SparseSettings

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        alpha = self.settings.alpha * (1.0 - batch.epoch / self.config.epochs)
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
    settings: InfluenceSettings

    def edit(self, model: nn.Module, forget: ImageSet, retain: ImageSet) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        with evaluating(model):
            total = len(forget) + len(retain)
            g_forget = _mean_gradient(model, params, forget, self.config.batch_size) * (len(forget) / total)
            g_retain = _mean_gradient(model, params, retain, self.config.batch_size) * (len(forget) / total)
            generator = torch.Generator().manual_seed(self.config.seed)
            chosen = torch.randperm(len(retain), generator=generator)[:self.settings.samples]
            per_sample = torch.stack([_mean_gradient(model, params, retain.subset(chosen[i:i + 1]), 1)
                                      for i in range(len(chosen))])
            step = woodfisher_solve(per_sample, g_forget - g_retain, self.settings.damping)
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(
                    torch.nn.utils.parameters_to_vector(params) + self.settings.alpha * step.to(params[0].dtype),
                    params)


class PiggybackShrink(FineTune):
    """`piggyback_shrink`: learn a sparse binary mask of the weights the forget set needs (Piggyback,
    L1 on the scores), multiply those weights by eta, then fine-tune on the retain set."""

    name = "piggyback_shrink"
    settings: PiggybackSettings

    def edit(self, model: nn.Module, forget: ImageSet, retain: ImageSet) -> Mask:
        s = self.settings
        with evaluating(model):
            mask = piggyback.learn_mask(
                model, piggyback.last_stage(model, s.params), image_batches(forget, self.config.batch_size),
                penalty=s.penalty, threshold=s.threshold, init=s.init, lr=s.mask_lr, epochs=s.mask_epochs,
                seed=self.config.seed)
        piggyback.shrink(model, mask, s.eta)
        mask.metadata["eta"] = s.eta
        return mask


class KaggleFirst(Method):
    """`kaggle_1st` (NeurIPS 2023 unlearning challenge winner): push forget outputs toward the uniform
    distribution (KL) for the first `kl_epochs`, then contrast forget against retain outputs
    with a temperature while fitting the retain set (cross-entropy)."""

    name = "kaggle_1st"
    uses_forget = True
    uses_retain = True
    settings: KaggleFirstSettings

    def loss(self, model: nn.Module, batch: StepBatch) -> Tensor:
        c = self.config
        x_forget, _ = batch.forget
        forget_logits = model(x_forget)
        if batch.progress < self.settings.kl_epochs / c.epochs:
            uniform = torch.full_like(forget_logits, 1.0 / forget_logits.shape[1])
            return F.kl_div(F.log_softmax(forget_logits, dim=1), uniform, reduction="batchmean")
        x_retain, y_retain = batch.retain
        retain_logits = model(x_retain)
        similarity = F.normalize(forget_logits, dim=1) @ F.normalize(retain_logits, dim=1).T / self.settings.temperature
        contrast = -F.log_softmax(similarity, dim=1).mean()
        return contrast + F.cross_entropy(retain_logits, y_retain, label_smoothing=c.label_smoothing)


class KaggleSecond(FineTune):
    """`kaggle_2nd` (runner-up): re-initialise the conv/linear weights with the smallest forget-gradient
    magnitude (the saliency mask's complement), then fine-tune on retain with the gradients of all
    other weights scaled by `grad_scale` (a soft mask)."""

    name = "kaggle_2nd"
    uses_mask = True
    settings: KaggleSecondSettings

    def edit(self, model: nn.Module, forget: ImageSet, retain: ImageSet) -> Mask:
        c, s = self.config, self.settings
        with evaluating(model):
            salient = compute_mask(model, image_batches(forget, c.batch_size), forget_loss,
                                   ratio=1.0 - s.reinit_ratio, params=_layer_weights(model).__contains__,
                                   loss_name="cross_entropy", progress=False)
        fresh = {name: ~m for name, m in salient.masks.items()}
        reinitialise(model, fresh, c.seed)
        weights = {name: torch.where(fresh[name], 1.0, s.grad_scale) if name in fresh
                   else torch.full(p.shape, s.grad_scale) for name, p in model.named_parameters()
                   if p.requires_grad}
        metadata = {**salient.metadata, "kind": "kaggle_2nd", "reinit_ratio": s.reinit_ratio,
                    "grad_scale": s.grad_scale}
        return Mask(weights, metadata, soft=True)


class SelectiveSynapticDampening(Method):
    """`ssd`: dampen the weights whose Fisher importance on the forget set exceeds `alpha` times
    their importance on the whole training set (one-shot, no training)."""

    name = "ssd"
    trains = False
    settings: SSDSettings

    def edit(self, model: nn.Module, forget: ImageSet, retain: ImageSet) -> Mask:
        c = self.config
        everything = ImageSet(torch.cat([forget.images, retain.images]), torch.cat([forget.labels, retain.labels]))
        shuffled = torch.randperm(len(everything), generator=torch.Generator().manual_seed(c.seed))
        with evaluating(model):
            on_forget = fisher.fisher_diagonal(model, image_batches(forget, c.batch_size))
            on_all = fisher.fisher_diagonal(model, image_batches(everything.subset(shuffled), c.batch_size))
        return fisher.dampen(model, on_forget, on_all, alpha=self.settings.alpha, strength=self.settings.strength)


def image_batches(data: ImageSet, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """`data` in order as (float images in [0, 1], labels) batches."""
    return [(to_input(data.images[i:i + batch_size]), data.labels[i:i + batch_size])
            for i in range(0, len(data), batch_size)]


def _layer_weights(model: nn.Module) -> set[str]:
    """Names of the convolution kernels and linear weight matrices (dim > 1) of `model`."""
    return {name for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1}


@torch.no_grad()
def reinitialise(model: nn.Module, chosen: dict[str, Tensor], seed: int) -> None:
    """Redraw the `chosen` entries like PyTorch's default conv/linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    The draw has its own stream: a generator seeded with the run's seed itself would redraw the very values
    `torch.manual_seed(seed)` gave the original at initialisation (same bound, same order)."""
    generator = stream_generator(seed, REINIT_STREAM, 0)
    for name, p in model.named_parameters():
        if name in chosen:
            bound = 1.0 / math.sqrt(p[0].numel())
            fresh = torch.empty(p.shape).uniform_(-bound, bound, generator=generator).to(p.device, p.dtype)
            p.copy_(torch.where(chosen[name].to(p.device), fresh, p))


def _mean_gradient(model: nn.Module, params: list[nn.Parameter], data: ImageSet, batch_size: int) -> Tensor:
    """The gradient of the mean cross-entropy over `data`, flattened."""
    total = [torch.zeros_like(p) for p in params]
    for i in range(0, len(data), batch_size):
        x, y = to_input(data.images[i:i + batch_size]), data.labels[i:i + batch_size]
        loss = F.cross_entropy(model(x), y, reduction="sum") / len(data)
        for acc, g in zip(total, torch.autograd.grad(loss, params), strict=False):
            acc.add_(g)
    return torch.cat([t.flatten() for t in total]).double()


def woodfisher_solve(per_sample: Tensor, v: Tensor, damping: float) -> Tensor:
    """(damping * I + G^T G / N)^-1 v for the N x d matrix G of per-sample gradients (Woodbury identity)."""
    n = per_sample.shape[0]
    gram = per_sample @ per_sample.T + n * damping * torch.eye(n, dtype=per_sample.dtype, device=per_sample.device)
    coefficients = torch.linalg.solve(gram, per_sample @ v)
    return (v - per_sample.T @ coefficients) / damping


def _implementations() -> dict[str, type[Method]]:
    """Every Method subclass by name, in the order of the settings registry (a name without one fails here)."""
    found, pending = {}, list(Method.__subclasses__())
    while pending:
        cls = pending.pop()
        found[cls.name] = cls
        pending.extend(cls.__subclasses__())
    return {name: found[name] for name in METHOD_NAMES}


METHODS: dict[str, type[Method]] = _implementations()


def build_method(config: UnlearnSharedConfig) -> Method:
    """The method an unlearning config names, with the shared settings and its own section."""
    return METHODS[config.method](config, config.settings)


def forget_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The forget loss of the saliency mask: cross-entropy on the forget set (SalUn)."""
    x, y = batch
    return F.cross_entropy(model(x), y)
