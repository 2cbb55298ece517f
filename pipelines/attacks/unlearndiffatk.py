"""UnlearnDiffAtk (Zhang et al. 2024, OPTML-Group/Diffusion-MU-Attack `src/attackers/text_grad_.py` with
`src/tasks/classifier_.py`): the erased model's own diffusion loss as the attack objective.

k tokens are prepended to the prompt. Each is a distribution over the whole vocabulary, kept on the simplex.
A step samples one token per slot from it (straight-through: the backward pass hands the hardtanh of the
gradient to the distribution), conditions the erased UNet on the result, noises the base model's image of
the prompt to timestep t and takes the MSE between the noise and the UNet's prediction; Adam updates the
distribution and a bisection projects it back onto the simplex. The timesteps T//n//2, T//n//2 + T//n, ...
are attacked in turn, `iterations` steps each; after each the most likely tokens are a candidate, which the
runner judges (stopping at the first success).
"""
from __future__ import annotations

from collections.abc import Iterator

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


class SampleOneHot(torch.autograd.Function):
    """Forward: one token per row drawn from the row's distribution, as one-hot rows. Backward: hardtanh of
    the incoming gradient (the reference's straight-through estimator)."""

    @staticmethod
    def forward(ctx, distribution: Tensor, generator: torch.Generator) -> Tensor:  # noqa: ARG004
        draws = torch.multinomial(distribution.detach().float().cpu(), 1, generator=generator).view(-1)
        return F.one_hot(draws, distribution.shape[-1]).to(distribution)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # noqa: ARG004
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


def diffusion_loss(pipe: StableDiffusionPipeline, alphas: Tensor, x0: Tensor, timestep: int, condition: Tensor,
                   noise: Tensor) -> Tensor:
    """MSE between `noise` and the UNet's prediction on x0 noised to `timestep` (the reference's l2 criterion)."""
    alpha = alphas[timestep]
    noisy = x0 * alpha.sqrt().to(x0) + noise * (1 - alpha).sqrt().to(x0)
    prediction = pipe.unet(noisy, timestep, encoder_hidden_states=condition).sample
    return F.mse_loss(prediction.float(), noise.float())


def objective(pipe: StableDiffusionPipeline, x0: Tensor, ids: Tensor, timesteps: list[int], seed: int) -> float:
    """The attack's loss of fixed token ids, averaged over `timesteps` with noise drawn from `seed` (no sampling
    of tokens, so two id rows can be compared)."""
    generator = torch.Generator("cpu").manual_seed(seed)
    alphas = alphas_cumprod(pipe)
    with torch.no_grad():
        condition = pipe.text_encoder(ids.to(pipe.unet.device))[0]
        losses = [float(diffusion_loss(pipe, alphas, x0, t, condition,
                                       torch.randn(x0.shape, generator=generator).to(x0))) for t in timesteps]
    return sum(losses) / len(losses)


class UnlearnDiffAtk(Attack):
    """Prepend k tokens optimised against the erased UNet's diffusion loss toward the base model's image."""

    name = "unlearndiffatk"

    def layout(self, original: Tensor, eos: int) -> tuple[Tensor, Tensor, Tensor]:
        """(bos, prompt tokens, eos padding) of the original ids, the prompt cut so that k tokens fit in 77."""
        k = self.settings.k
        total = original.shape[1]
        if k > total - 2:
            raise ErasureError(f"unlearndiffatk.k = {k} leaves no room for the prompt in {total} tokens; pass "
                               f"--unlearndiffatk-k <= {total - 2}")
        keep = min(int((original[0] == eos).nonzero()[0]) - 1, total - 2 - k)
        return original[:, :1], original[:, 1:1 + keep], torch.full((1, total - 1 - k - keep), eos)

    def candidates(self, target: Target, prompt: Prompt, original: Tensor, generator: torch.Generator
                   ) -> Iterator[Candidate]:
        settings, pipe, cost = self.settings, target.pipe, target.cost
        tokenizer, device = pipe.tokenizer, target.device
        head, middle, tail = self.layout(original, tokenizer.eos_token_id)
        table = vocabulary(pipe.text_encoder).detach()
        fixed = [table[part[0].to(device)] for part in (head, middle, tail)]
        x0 = image_latent(pipe, target.reference_image(prompt))
        distribution = project_simplex(torch.full((settings.k, table.shape[0]), 1 / table.shape[0], device=device))
        distribution.requires_grad_(True)
        optimizer = torch.optim.Adam([distribution], lr=settings.lr, weight_decay=settings.weight_decay)
        alphas = alphas_cumprod(pipe)
        for timestep in spaced_timesteps(len(alphas), settings.timesteps):
            losses = []
            for _ in range(settings.iterations):
                adversarial = SampleOneHot.apply(distribution, generator).to(table.dtype) @ table
                embeddings = torch.cat([fixed[0], adversarial, fixed[1], fixed[2]])[None]
                noise = torch.randn(x0.shape, generator=generator).to(x0)
                condition = encode_embeddings(pipe.text_encoder, embeddings)
                loss = diffusion_loss(pipe, alphas, x0, timestep, condition, noise)
                optimizer.zero_grad()
                distribution.grad = torch.autograd.grad(loss, [distribution])[0]
                optimizer.step()
                with torch.no_grad():
                    distribution.copy_(project_simplex(distribution))
                losses.append(float(loss.detach()))
                cost.unet_calls += 1
                cost.unet_backward += 1
                cost.text_encoder_calls += 1
            chosen = distribution.detach().argmax(-1).cpu()[None]
            ids = torch.cat([head, chosen, middle, tail], dim=1)
            yield Candidate(ids, decode(tokenizer, ids), objective=sum(losses) / len(losses), step=timestep)

