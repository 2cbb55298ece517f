"""Diffusion objectives shared by Stable Diffusion and the class-conditional DDPM.

Each takes `predict(x_t, t, condition) -> epsilon`, so it does not care whether the condition is a
text embedding (SD) or a class label (DDPM). Noise and timesteps come from an explicit generator,
which makes a step reproducible from (seed, step) and resume exact.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Predict = Callable[[Tensor, Tensor, Any], Tensor]


def guided_epsilon(conditional: Tensor, unconditional: Tensor, weight: float) -> Tensor:
    """Classifier-free guidance in the SalUn/DDPM form: (1 + w) * eps(x, c) - w * eps(x, null).

    (diffusers' `guidance_scale` s is the same thing with w = s - 1.)
    """
    return (1.0 + weight) * conditional - weight * unconditional


def noised(scheduler: Any, x0: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Draw timesteps and noise on the CPU generator and return (x_t, noise, t) on x0's device."""
    batch = x0.shape[0]
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (batch,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device, x0.dtype)
    return scheduler.add_noise(x0, noise, t), noise, t


def diffusion_loss(predict: Predict, scheduler: Any, x0: Tensor, condition: Any, generator: torch.Generator) -> Tensor:
    """The ordinary epsilon-prediction loss: MSE(eps(x_t, t, c), noise)."""
    x_t, noise, t = noised(scheduler, x0, generator)
    return F.mse_loss(predict(x_t, t, condition).float(), noise.float())


def guided_diffusion_loss(predict: Predict, scheduler: Any, x0: Tensor, condition: Any, null: Any, weight: float,
                          generator: torch.Generator) -> Tensor:
    """MSE between the guided prediction (1 + w) eps(c) - w eps(null) and the true noise (SalUn's SD mask loss)."""
    x_t, noise, t = noised(scheduler, x0, generator)
    guided = guided_epsilon(predict(x_t, t, condition), predict(x_t, t, null), weight)
    return F.mse_loss(guided.float(), noise.float())


def remap_loss(predict: Predict, scheduler: Any, x0: Tensor, forget: Any, remap: Any,
               generator: torch.Generator) -> Tensor:
    """MSE(eps(x_t, t, forget), stop-grad eps(x_t, t, remap)) on the same noised input and timestep."""
    x_t, _, t = noised(scheduler, x0, generator)
    with torch.no_grad():
        target = predict(x_t, t, remap)
    return F.mse_loss(predict(x_t, t, forget).float(), target.float())


def gradient_ascent_loss(predict: Predict, scheduler: Any, x0: Tensor, condition: Any,
                         generator: torch.Generator) -> Tensor:
    """The negated diffusion loss on forget data (gradient ascent; diverges without a bound)."""
    return -diffusion_loss(predict, scheduler, x0, condition, generator)
