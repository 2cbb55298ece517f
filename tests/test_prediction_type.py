"""Every diffusion loss trains against what the model predicts: the noise, or the velocity of a v-prediction
model (SD 2.x at 768 px), as diffusers' train_text_to_image picks it from `prediction_type`."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler

from erasure.config import load_config
from erasure.io import RunDir
from pipelines.families import text_conditioning
from pipelines.methods.base import Draw
from pipelines.objectives import diffusion_loss, timesteps, training_target
from pipelines.sd_config import SDEraseConfig
from pipelines.stable_diffusion import Conditions, Eraser, Latents
from pipelines.tiny import build_tiny_pipeline


def _predict(x_t: torch.Tensor, t: torch.Tensor, condition: object) -> torch.Tensor:
    return 0.5 * x_t + 0.01 * t.float()[:, None, None, None]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_diffusion_loss_is_diffusers_training_loss_for_each_prediction_type(prediction_type):
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type)
    x0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    ours = diffusion_loss(_predict, scheduler, x0, None, torch.Generator().manual_seed(0))
    # train_text_to_image.py, restated with the same draws (timesteps, then noise)
    generator = torch.Generator().manual_seed(0)
    t = timesteps(100, 4, generator)
    noise = torch.randn(x0.shape, generator=generator)
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    reference = F.mse_loss(_predict(scheduler.add_noise(x0, noise, t), t, None), target)
    torch.testing.assert_close(ours, reference)


def test_an_unknown_prediction_type_is_refused_by_name():
    scheduler = DDPMScheduler(num_train_timesteps=10)
    scheduler.register_to_config(prediction_type="flow")
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        training_target(scheduler, torch.zeros(1), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_sd_gradient_ascent_and_retain_terms_of_a_v_prediction_pipeline_use_the_velocity(tmp_path: Path):
    """A tiny SD 2.x-style pipeline (v-prediction): with one latent and no posterior noise, x0 is known, so the
    target of each chunk must be get_velocity(x0, noise, t) with the noise implied by x_t."""
    pipe = build_tiny_pipeline()
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type="v_prediction")
    config = load_config(SDEraseConfig, None, {"concept": "nudity", "model": "tiny", "method": "ga", "batch_size": 4})
    x0 = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    latents = Latents(x0.expand(6, -1, -1, -1).clone(), torch.zeros(6, 4, 4, 4), torch.zeros(6, dtype=torch.long))
    embeddings = text_conditioning(pipe).encode([config.forget_prompt, config.remap_prompt, "", "a photo"])
    conditions = Conditions(embeddings[0:1], embeddings[1:2], embeddings[2:3], embeddings[3:])
    eraser = Eraser(config, pipe, Accelerator(cpu=True), RunDir(tmp_path / "run"),
                    {"forget": latents, "retain": latents}, conditions)
    batch = x0.expand(4, -1, -1, -1)
    draws = [Draw(0, torch.Generator().manual_seed(seed), slice(None), 4, 0) for seed in (3, 4)]
    for chunk in (eraser.method.forget_chunk(eraser, draws[0]), eraser.retain_chunk(draws[1])):
        alphas = eraser.scheduler.alphas_cumprod[chunk.t][:, None, None, None]
        noise = (chunk.x_t - alphas.sqrt() * x0) / (1 - alphas).sqrt()
        velocity = eraser.scheduler.get_velocity(batch, noise, chunk.t)
        torch.testing.assert_close(chunk.target, velocity, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(chunk.target, noise, atol=1e-2)  # what an epsilon target would have been
