"""Prefix-token attacks of Diffusion-MU-Attack (`src/attackers/text_grad_.py`, `hard_prompt_.py` with the
tasks `src/tasks/classifier_.py`, `P4D_.py`): k tokens prepended to the prompt, optimised with Adam against a
diffusion loss on the base model's image of the prompt.

The timesteps T//n//2, T//n//2 + T//n, ... are attacked in turn, `iterations` steps each. A step noises the
image's latent (VAE posterior mean) to timestep t with fresh noise, conditions the erased UNet on the prompt
with the current tokens and takes the MSE between its prediction and the attack's goal (the noise for
UnlearnDiffAtk, the base model's prediction for the original prompt for P4D). After each timestep the current
discrete tokens are a candidate, which the runner judges (stopping at the first success). An attack says how
its tokens are parameterised (`start`, `embed`, `settle`, `chosen`) and what the prediction should match (`goal`).
"""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Generator

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from torch import Tensor

from erasure.errors import ErasureError
from erasure.media import to_nchw_tensor
from erasure.prompts import Prompt
from pipelines.attacks.base import Attack, Candidate, Target
from pipelines.attacks.text import decode, encode_embeddings, vocabulary


def spaced_timesteps(train_steps: int, n: int) -> list[int]:
    """The reference's n evenly spaced timesteps: T//n//2, then every T//n."""
    stride = max(train_steps // n, 1)
    return list(range(stride // 2, train_steps, stride))[:n]


def image_latent(pipe: StableDiffusionPipeline, image: np.ndarray) -> Tensor:
    """The VAE's posterior mean of a uint8 RGB image, scaled as the UNet sees latents."""
    pixels = to_nchw_tensor([image]).to(pipe.vae.device, pipe.vae.dtype) / 127.5 - 1
    with torch.no_grad():
        return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor


def alphas_cumprod(pipe: StableDiffusionPipeline) -> Tensor:
    """The training noise schedule of the pipeline's scheduler (whatever sampler it is)."""
    return DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod


def add_noise(alphas: Tensor, x0: Tensor, timestep: int, noise: Tensor) -> Tensor:
    """x0 forward-noised to `timestep`."""
    alpha = alphas[timestep]
    return x0 * alpha.sqrt().to(x0) + noise * (1 - alpha).sqrt().to(x0)


class PrefixTokenAttack(Attack):
    """k prepended tokens optimised against the erased UNet's MSE to `goal` at spaced timesteps."""

    def layout(self, original: Tensor, eos: int) -> tuple[Tensor, Tensor, Tensor]:
        """(bos, prompt tokens, eos padding) of the original ids, the prompt cut so that k tokens fit."""
        k = self.settings.k
        total = original.shape[1]
        if k > total - 2:
            raise ErasureError(f"{self.name}.k = {k} leaves no room for the prompt in {total} tokens; pass "
                               f"--{self.name}-k <= {total - 2}")
        keep = min(int((original[0] == eos).nonzero()[0]) - 1, total - 2 - k)
        return original[:, :1], original[:, 1:1 + keep], torch.full((1, total - 1 - k - keep), eos)

    @abstractmethod
    def start(self, table: Tensor, generator: torch.Generator) -> Tensor:
        """The optimised parameter at the start."""

    @abstractmethod
    def embed(self, parameter: Tensor, table: Tensor, generator: torch.Generator) -> Tensor:
        """The k token embeddings the UNet is conditioned on, differentiable with respect to `parameter`."""

    def settle(self, parameter: Tensor) -> None:
        """Bring the parameter back to its domain after an optimiser step (default: nothing to do)."""

    @abstractmethod
    def chosen(self, parameter: Tensor, table: Tensor) -> Tensor:
        """The k discrete token ids the parameter stands for now."""

    @abstractmethod
    def goal(self, target: Target, noisy: Tensor, timestep: int, noise: Tensor, original: Tensor,
             x0: Tensor) -> Tensor:
        """What the erased UNet's prediction on `noisy` (x0 noised to `timestep` with `noise`) should match (no
        gradient)."""

    def loss(self, target: Target, alphas: Tensor, x0: Tensor, timestep: int, condition: Tensor, noise: Tensor,
             original: Tensor) -> Tensor:
        """MSE between the erased UNet's prediction under `condition` and the goal (the references' l2)."""
        noisy = add_noise(alphas, x0, timestep, noise)
        prediction = target.pipe.unet(noisy, timestep, encoder_hidden_states=condition).sample
        target.cost.unet_calls += 1
        return F.mse_loss(prediction.float(), self.goal(target, noisy, timestep, noise, original, x0).float())

    def objective(self, target: Target, x0: Tensor, ids: Tensor, original: Tensor, timesteps: list[int],
                  seed: int) -> float:
        """The loss of fixed token ids averaged over `timesteps`, noise drawn from `seed` (comparable between ids)."""
        generator = torch.Generator("cpu").manual_seed(seed)
        alphas = alphas_cumprod(target.pipe)
        with torch.no_grad():
            condition = target.pipe.text_encoder(ids.to(target.device))[0]
            losses = [float(self.loss(target, alphas, x0, t, condition,
                                      torch.randn(x0.shape, generator=generator).to(x0), original))
                      for t in timesteps]
        return sum(losses) / len(losses)

    def candidates(self, target: Target, prompt: Prompt, original: Tensor, generator: torch.Generator
                   ) -> Generator[Candidate, None, None]:
        settings, pipe, cost = self.settings, target.pipe, target.cost
        tokenizer, device = pipe.tokenizer, target.device
        head, middle, tail = self.layout(original, tokenizer.eos_token_id)
        table = vocabulary(pipe.text_encoder).detach()
        fixed = [table[part[0].to(device)] for part in (head, middle, tail)]
        x0 = image_latent(pipe, target.reference_image(prompt))
        parameter = self.start(table, generator).requires_grad_(True)
        optimizer = torch.optim.Adam([parameter], lr=settings.lr, weight_decay=settings.weight_decay)
        alphas = alphas_cumprod(pipe)
        for timestep in spaced_timesteps(len(alphas), settings.timesteps):
            losses = []
            for _ in range(settings.iterations):
                embeddings = torch.cat([fixed[0], self.embed(parameter, table, generator), fixed[1], fixed[2]])
                noise = torch.randn(x0.shape, generator=generator).to(x0)
                condition = encode_embeddings(pipe.text_encoder, embeddings[None])
                loss = self.loss(target, alphas, x0, timestep, condition, noise, original)
                optimizer.zero_grad()
                parameter.grad = torch.autograd.grad(loss, [parameter])[0]
                optimizer.step()
                with torch.no_grad():
                    self.settle(parameter)
                losses.append(float(loss.detach()))
                cost.unet_backward += 1
                cost.text_encoder_calls += 1
            ids = torch.cat([head, self.chosen(parameter.detach(), table).cpu()[None], middle, tail], dim=1)
            yield Candidate(ids, decode(tokenizer, ids), objective=sum(losses) / len(losses), step=timestep)
