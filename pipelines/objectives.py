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
    return noised_rows(scheduler, x0, generator, slice(None), x0.shape[0])


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


# ---------------------------------------------------------------------------- data-parallel shards and targets


def noised_rows(scheduler: Any, x0: Tensor, generator: torch.Generator, rows: slice,
                total: int) -> tuple[Tensor, Tensor, Tensor]:
    """`noised` for the rows `rows` of a global batch of `total`: the whole batch's timesteps and noise are
    drawn (in `noised`'s order) and only `rows` kept, so a data-parallel shard gets exactly the noise that
    its samples get in a one-process run. With rows=slice(None) and total=len(x0) it equals `noised`."""
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (total,), generator=generator)[rows].to(x0.device)
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, dtype=torch.float32)[rows]
    noise = noise.to(x0.device, x0.dtype)
    return scheduler.add_noise(x0, noise, t), noise, t


def esd_target(predict: Predict, x_t: Tensor, t: Tensor, concept: Any, null: Any, eta: float) -> Tensor:
    """ESD's negative-guidance target eps(null) - eta (eps(c) - eps(null)) from a frozen `predict` (no grad)."""
    with torch.no_grad():
        unconditional = predict(x_t, t, null)
        return unconditional - eta * (predict(x_t, t, concept) - unconditional)
