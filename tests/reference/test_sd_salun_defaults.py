"""Conformance: `erasure sd --concept nudity|church` defaults are the SalUn reference recipes.

SD/train-scripts/nsfw_removal.py and the SD README of OPTML-Group/Unlearn-Saliency (a6e89fd): 800 forget images,
batch 8, one epoch (100 steps), alpha 0.1, Adam 1e-5, no gradient clipping, latents drawn from the VAE posterior
(`get_input` -> `encode_first_stage` -> `get_first_stage_encoding`, a sample); random_label.py with the README's
flags for objects: alpha 0.5, 5 epochs, the forgotten class remapped to (c + 1) mod 10, prompts "an image of a {c}".
"""
from __future__ import annotations

import torch

from erasure.config import load_config
from pipelines.sd_config import SDEraseConfig


def test_nudity_defaults_are_the_reference_recipe() -> None:
    config = load_config(SDEraseConfig, None, {"concept": "nudity"})
    assert (config.forget_prompt, config.remap_prompt) == ("a photo of a nude person",
                                                           "a photo of a person wearing clothes")
    assert config.total_steps(config.num_images) == 100 and config.num_images == 800 and config.batch_size == 8
    assert config.alpha == 0.1 and config.lr == 1e-5 and config.grad_clip is None and config.posterior == "sample"


def test_object_defaults_remap_to_the_next_imagenette_class_for_five_epochs() -> None:
    config = load_config(SDEraseConfig, None, {"concept": "church"})
    imagenette = ["tench", "english springer", "cassette player", "chain saw", "church", "french horn",
                  "garbage truck", "gas pump", "golf ball", "parachute"]
    forgotten = imagenette.index("church")
    assert config.forget_prompt == "an image of a church"
    assert config.remap_prompt == f"an image of a {imagenette[(forgotten + 1) % 10]}"
    assert config.alpha == 0.5 and config.total_steps(config.num_images) == 5 * 100


def test_posterior_samples_are_mean_plus_std_noise_and_seeded() -> None:
    from pipelines.stable_diffusion import Latents

    mean, std = torch.randn(6, 4, 2, 2), torch.rand(6, 4, 2, 2)
    latents = Latents(mean, std, torch.zeros(6, dtype=torch.long))
    index = torch.tensor([1, 4])
    drawn = latents.draw(index, torch.Generator().manual_seed(5))
    e = torch.randn((2, 4, 2, 2), generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(drawn, mean[index] + std[index] * e)
    assert torch.equal(latents.draw(index, None), mean[index])
    # a shard of a global batch of 4 gets the rows a one-process run gives them
    full = latents.draw(torch.tensor([0, 1, 2, 3]), torch.Generator().manual_seed(7))
    shard = latents.draw(torch.tensor([1, 3]), torch.Generator().manual_seed(7), slice(1, None, 2), 4)
    torch.testing.assert_close(shard, full[1::2])
