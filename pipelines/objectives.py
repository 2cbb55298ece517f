"""Diffusion objectives shared by Stable Diffusion and the class-conditional DDPM.

Each takes `predict(x_t, t, condition) -> prediction`, so it does not care whether the condition is a
text embedding (SD) or a class label (DDPM). What the model predicts follows the scheduler's
`prediction_type`, as diffusers' training scripts choose it: the noise (`epsilon`, SD 1.x, SD 2 base),
the velocity (`v_prediction`, SD 2.x at 768 px) or the clean sample (`sample`); every loss here trains
against that target. A flow-matching model (SD3, FLUX; `FlowMatchEulerDiscreteScheduler`) is noised as diffusers'
SD3 and FLUX scripts noise it: x_t = (1 - sigma) x0 + sigma noise, the model's timestep sigma x 1000, sigma from
the scheduler's training sigmas drawn uniformly (their `weighting_scheme none`); the target is the velocity
noise - x0, without their optional output preconditioning. Everywhere else a timestep is an integer index t in
[0, num_train_timesteps) with 0 the cleanest (a DDPM timestep); `model_timesteps` maps it to what the model
reads. Noise and timesteps come from an explicit generator, which makes a step reproducible from (seed, step)
and resume exact.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

Predict = Callable[[Tensor, Tensor, Any], Tensor]
REDUCTIONS = ("mean", "sum")
"""How a squared error becomes a loss: 'mean' over every element (diffusers' examples), or 'sum' over each
sample's channels and pixels and then the mean over the batch (Ho et al.'s DDPM code and the SalUn DDPM
reference, `noise_estimation_loss_conditional`); 'sum' is 'mean' times the elements per sample (3 x 32 x 32)."""


def squared_error(prediction: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    """The squared error of a prediction in float32, reduced as `reduction` says (see REDUCTIONS)."""
    error = (prediction.float() - target.float()).square()
    if reduction == "sum":
        return error.flatten(1).sum(dim=1).mean()
    if reduction != "mean":
        raise ValueError(f"unknown reduction '{reduction}'; choose one of {REDUCTIONS}")
    return error.mean()


def guided_epsilon(conditional: Tensor, unconditional: Tensor, weight: float) -> Tensor:
    """Classifier-free guidance in the SalUn/DDPM form: (1 + w) * eps(x, c) - w * eps(x, null).

    (diffusers' `guidance_scale` s is the same thing with w = s - 1.)
    """
    return (1.0 + weight) * conditional - weight * unconditional


def is_flow_matching(scheduler: Any) -> bool:
    """Whether `scheduler` is a flow-matching one (SD3's `FlowMatchEulerDiscreteScheduler`)."""
    return type(scheduler).__name__.startswith("FlowMatch")


def training_scheduler(scheduler: Any) -> Any:
    """A fresh scheduler that noises training samples for a model sampled by `scheduler`: DDPM's with its config
    (the same betas and prediction type) or, for flow matching, its own class with its shifted training sigmas
    (before any `set_timesteps`)."""
    from diffusers import DDPMScheduler

    return (type(scheduler) if is_flow_matching(scheduler) else DDPMScheduler).from_config(scheduler.config)


def model_timesteps(scheduler: Any, t: Tensor) -> Tensor:
    """The timesteps the model reads for DDPM-style indices `t` (0 the cleanest): `t` itself, or for flow matching
    sigma(t) x 1000 with sigma(t) the (t+1)-th smallest training sigma."""
    if not is_flow_matching(scheduler):
        return t
    steps = scheduler.config.num_train_timesteps
    return scheduler.timesteps[steps - 1 - t.cpu()].to(t.device)


def training_target(scheduler: Any, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """What the model should predict at x_t = add_noise(x0, noise, t), by `scheduler.config.prediction_type`
    (the velocity noise - x0 under flow matching)."""
    if is_flow_matching(scheduler):
        return noise - x0
    kind = scheduler.config.get("prediction_type", "epsilon")
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"the scheduler's prediction_type '{kind}' is not supported; use epsilon, v_prediction or sample")


def noised(scheduler: Any, x0: Tensor, generator: torch.Generator, *,
           antithetic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Draw timesteps and noise on the CPU generator and return (x_t, target, t) on x0's device; the target
    is what the model predicts (`training_target`: the noise for an epsilon model)."""
    return noised_rows(scheduler, x0, generator, slice(None), x0.shape[0], antithetic=antithetic)


def diffusion_loss(predict: Predict, scheduler: Any, x0: Tensor, condition: Any, generator: torch.Generator, *,
                   reduction: str = "mean", antithetic: bool = False) -> Tensor:
    """The ordinary diffusion loss: squared error of the prediction at (x_t, t, c) against its training target."""
    x_t, target, t = noised(scheduler, x0, generator, antithetic=antithetic)
    return squared_error(predict(x_t, t, condition), target, reduction)


def guided_diffusion_loss(predict: Predict, scheduler: Any, x0: Tensor, condition: Any, null: Any, weight: float,
                          generator: torch.Generator, *, reduction: str = "mean", antithetic: bool = False) -> Tensor:
    """Squared error of the guided prediction (1 + w) eps(c) - w eps(null) against the training target (SalUn's
    mask loss for SD, and with reduction 'sum' and w = 2 for the DDPM; guidance is linear, so it applies to a
    velocity alike)."""
    x_t, target, t = noised(scheduler, x0, generator, antithetic=antithetic)
    guided = guided_epsilon(predict(x_t, t, condition), predict(x_t, t, null), weight)
    return squared_error(guided, target, reduction)


# ---------------------------------------------------------------------------- data-parallel shards and targets


def timesteps(steps: int, total: int, generator: torch.Generator, *, antithetic: bool = False) -> Tensor:
    """`total` uniform training timesteps; antithetic (the DDPM reference's sampling): draw n // 2 + 1 and pair each
    t with steps - 1 - t, which lowers the variance of the loss over a batch."""
    if not antithetic:
        return torch.randint(0, steps, (total,), generator=generator)
    half = torch.randint(0, steps, (total // 2 + 1,), generator=generator)
    return torch.cat([half, steps - 1 - half])[:total]


def noised_rows(scheduler: Any, x0: Tensor, generator: torch.Generator, rows: slice,
                total: int, *, antithetic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """`noised` for the rows `rows` of a global batch of `total`: the whole batch's timesteps and noise are
    drawn (in `noised`'s order) and only `rows` kept, so a data-parallel shard gets exactly the noise that
    its samples get in a one-process run. With rows=slice(None) and total=len(x0) it equals `noised`.
    Returns (x_t, target, t), the target as `training_target` gives it and t as the model reads it."""
    steps = scheduler.config.num_train_timesteps
    t = timesteps(steps, total, generator, antithetic=antithetic)[rows].to(x0.device)
    noise = torch.randn((total, *x0.shape[1:]), generator=generator, dtype=torch.float32)[rows]
    noise = noise.to(x0.device, x0.dtype)
    if is_flow_matching(scheduler):
        sigma = scheduler.sigmas[steps - 1 - t.cpu()].to(x0.device, x0.dtype).view(-1, *[1] * (x0.ndim - 1))
        x_t = (1.0 - sigma) * x0 + sigma * noise
        return x_t, training_target(scheduler, x0, noise, t), model_timesteps(scheduler, t)
    return scheduler.add_noise(x0, noise, t), training_target(scheduler, x0, noise, t), t


def flow_sampling_schedule(config: Any, steps: int, shape: tuple[int, ...]) -> dict[str, Any]:
    """`set_timesteps` arguments of a flow-matching sampler as the pipelines give them: none for a fixed shift (SD3);
    with dynamic shifting (FLUX) the sigmas linspace(1, 1 / steps, steps) and the shift mu interpolated from the
    number of 2x2 latent patches, as `FluxPipeline` computes them."""
    if not config.get("use_dynamic_shifting"):
        return {}
    import numpy as np
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift((shape[-2] // 2) * (shape[-1] // 2), config.get("base_image_seq_len", 256),
                         config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                         config.get("max_shift", 1.15))
    return {"sigmas": np.linspace(1.0, 1 / steps, steps), "mu": mu}


def sampling_window(predict: Predict, scheduler: Any, noise: Tensor, condition: Tensor, null: Tensor, *, steps: int,
                    window: tuple[int, int], guidance: float) -> Tensor:
    """The latent after sampling steps window[0]..window[1]-1 of `steps` (step 0 is the noisiest) started from
    `noise`, with classifier-free guidance eps(null) + guidance (eps(c) - eps(null)) (ESD's `quick_sample_till_t`),
    without gradient: DDIM (eta 0) with `scheduler`'s config, or its own Euler steps under flow matching. Like the
    reference's ldm DDIM sampler (and unlike diffusers' DDIM defaults) the predicted x0 is not clipped and the last
    step ends at alphas_cumprod[0]."""
    from diffusers import DDIMScheduler

    if is_flow_matching(scheduler):
        scheduler = type(scheduler).from_config(scheduler.config)
        scheduler.set_timesteps(steps, **flow_sampling_schedule(scheduler.config, steps, noise.shape))
    else:
        scheduler = DDIMScheduler.from_config(scheduler.config, clip_sample=False, set_alpha_to_one=False)
        scheduler.set_timesteps(steps)
    latents = noise * getattr(scheduler, "init_noise_sigma", 1.0)
    with torch.no_grad():
        for t in scheduler.timesteps[window[0]:window[1]]:
            both = predict(torch.cat([latents, latents]), t, torch.cat([null, condition]))
            unconditional, conditional = both.chunk(2)
            latents = scheduler.step(unconditional + guidance * (conditional - unconditional), t, latents).prev_sample
    return latents
