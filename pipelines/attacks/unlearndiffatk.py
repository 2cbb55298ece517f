"""UnlearnDiffAtk (Zhang et al. 2024, OPTML-Group/Diffusion-MU-Attack `src/attackers/text_grad_.py` with
`src/tasks/classifier_.py`): the erased model's own diffusion loss as the attack objective.

Each of the k prepended tokens is a distribution over the whole vocabulary, uniform at the start and kept on
the simplex. A step samples one token per slot from it (straight-through: the backward pass hands the hardtanh
of the gradient to the distribution) and the goal is the noise itself: the tokens that make the erased model
denoise the base model's image of the prompt best. Adam, then a bisection projects back onto the simplex; a
candidate takes the most likely token of each slot.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

from pipelines.attacks.base import Target
from pipelines.attacks.prefix import PrefixTokenAttack
from pipelines.objectives import training_target


class SampleOneHot(torch.autograd.Function):
    """Forward: one token per row drawn from the row's distribution, as one-hot rows. Backward: hardtanh of
    the incoming gradient (the reference's straight-through estimator)."""

    @staticmethod
    def forward(ctx, distribution: Tensor, generator: torch.Generator) -> Tensor:
        draws = torch.multinomial(distribution.detach().float().cpu(), 1, generator=generator).view(-1)
        return F.one_hot(draws, distribution.shape[-1]).to(distribution)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return F.hardtanh(grad), None


def project_simplex(a: Tensor, tol: float = 1e-5) -> Tensor:
    """Each row projected onto {x in [0, 1]^V : sum x = 1} by bisection on the shift mu of clip(a - mu, 0, 1)."""
    clipped = a.clamp(0, 1)
    low = a.min(-1, keepdim=True).values - 1
    high = a.max(-1, keepdim=True).values
    while float((high - low).max()) > tol:
        middle = (low + high) / 2
        above = (a - middle).clamp(0, 1).sum(-1, keepdim=True) > 1
        low, high = torch.where(above, middle, low), torch.where(above, high, middle)
    projected = (a - (low + high) / 2).clamp(0, 1)
    return torch.where((clipped.sum(-1, keepdim=True) - 1).abs() <= tol, clipped, projected)


class UnlearnDiffAtk(PrefixTokenAttack):
    """Prepend k tokens that make the erased UNet denoise the base model's image of the prompt best."""

    name = "unlearndiffatk"

    def start(self, table: Tensor, generator: torch.Generator) -> Tensor:
        uniform = torch.full((self.settings.k, table.shape[0]), 1 / table.shape[0], device=table.device)
        return project_simplex(uniform)

    def embed(self, parameter: Tensor, table: Tensor, generator: torch.Generator) -> Tensor:
        return SampleOneHot.apply(parameter, generator).to(table.dtype) @ table

    def settle(self, parameter: Tensor) -> None:
        parameter.copy_(project_simplex(parameter))

    def chosen(self, parameter: Tensor, table: Tensor) -> Tensor:
        return parameter.argmax(-1)

    def goal(self, target: Target, noisy: Tensor, timestep: int, noise: Tensor, original: Tensor,
             x0: Tensor) -> Tensor:
        """The diffusion training target: the noise for an epsilon model (the reference), the velocity for a
        v-prediction one (SD 2.x at 768 px), by the scheduler's `prediction_type`."""
        schedule = DDPMScheduler.from_config(target.pipe.scheduler.config)
        return training_target(schedule, x0, noise, torch.tensor([timestep]))
