"""A tiny, randomly initialised Stable Diffusion pipeline built from configs (no downloads).

It has the real architecture (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIP BPE
tokenizer) at toy width, so tests and offline smoke runs exercise the same code paths as SD v1.4.
`erasure sample --model tiny` uses it. Weights are seeded, so the same seed gives the same model.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_clip_tokenizer"
TINY_NAME = "tiny"
HIDDEN = 32


def tiny_tokenizer() -> CLIPTokenizer:
    """The committed byte-level CLIP tokenizer (514 tokens, no merges)."""
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def tiny_unet() -> UNet2DConditionModel:
    """A two-level conditional UNet with the SD v1 block types at width 32/64."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def tiny_vae() -> AutoencoderKL:
    """A two-level VAE with SD's latent layout (4 channels, 2x downsampling per level)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer) -> CLIPTextModel:
    """A two-layer CLIP text encoder whose vocabulary and special ids match `tokenizer`."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD pipeline with seeded random weights (32x32 images by default)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = tiny_unet()
        vae = tiny_vae()
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(tokenizer)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_tiny_pipeline(path: str | Path, seed: int = 0) -> Path:
    """Save a tiny pipeline in diffusers format (loads with `StableDiffusionPipeline.from_pretrained`)."""
    path = Path(path)
    build_tiny_pipeline(seed).save_pretrained(path)
    return path
