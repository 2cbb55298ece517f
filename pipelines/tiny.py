"""Tiny, randomly initialised Stable Diffusion pipelines built from configs (no downloads).

They have the real architectures at toy width, so tests and offline smoke runs exercise the same code paths as
the released models: `tiny` is SD v1 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIP BPE tokenizer);
`tiny-sd2` is SD 2.x at 768 px in kind (an OpenCLIP-style GELU text encoder, linear attention projections,
per-level head widths, v-prediction); `tiny-sdxl` is SDXL (two CLIP text encoders, the second with a projection;
a UNet with SDXL's added text-and-time conditioning, linear attention projections and two transformer layers in
its deeper block); `tiny-sd3` is SD3 (an MMDiT `SD3Transformer2DModel` trained by flow matching, two CLIP encoders
with projections and a T5 encoder whose SentencePiece-style tokenizer is built from a vocabulary written here, a
16-channel VAE with a shift factor); `tiny-flux` is FLUX.1-dev in kind (a `FluxTransformer2DModel` with double- and
single-stream blocks, rotary position ids and guidance distillation, one CLIP encoder for the pooled vector and a
T5 encoder for the sequence, FLUX's VAE factors and its dynamically shifted flow-matching scheduler). `--model
tiny` (or tiny-sd2, tiny-sdxl, tiny-sd3, tiny-flux) uses them. Weights are seeded: the same seed gives the same
model.
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PNDMScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tiny_clip_tokenizer"
TINY_NAME, TINY_SD2_NAME, TINY_SDXL_NAME, TINY_SD3_NAME, TINY_FLUX_NAME = (
    "tiny", "tiny-sd2", "tiny-sdxl", "tiny-sd3", "tiny-flux")
HIDDEN = 32
HIDDEN_2 = 48
"""The width of tiny SDXL's second encoder: the two differ, as SDXL's (768 and 1280), which is also how a
single-file checkpoint tells them apart."""
TIME_EMBED = 8
"""SDXL's `addition_time_embed_dim` at toy width: its added conditions are the pooled text (HIDDEN_2) and six
time ids of TIME_EMBED sinusoidal features each."""


def tiny_tokenizer() -> CLIPTokenizer:
    """The committed byte-level CLIP tokenizer (514 tokens, no merges)."""
    return CLIPTokenizer(str(TOKENIZER_DIR / "vocab.json"), str(TOKENIZER_DIR / "merges.txt"), model_max_length=77)


def tiny_unet(sd2: bool = False) -> UNet2DConditionModel:
    """A two-level conditional UNet with the SD v1 block types at width 32/64 (with SD 2.x's linear attention
    projections and per-level head widths when `sd2`)."""
    extra = {"use_linear_projection": True, "attention_head_dim": (4, 8)} if sd2 else {"attention_head_dim": 8}
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        norm_num_groups=8,
        **extra,
    )


VAE_FACTORS = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}
"""(scaling_factor, shift_factor) of the 16-channel VAEs of SD3 and FLUX."""


def tiny_vae(family: str = "sd") -> AutoencoderKL:
    """A two-level VAE with SD's latent layout (4 channels, 2x downsampling per level); with SD3's or FLUX's when
    `family` names one (16 channels, no quant convs, that family's scaling and shift factors)."""
    extra: dict[str, object] = {"latent_channels": 4}
    if family in VAE_FACTORS:
        scale, shift = VAE_FACTORS[family]
        extra = {"latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False,
                 "scaling_factor": scale, "shift_factor": shift}
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=8,
        sample_size=32,
        **extra,
    )


def tiny_t5_tokenizer() -> T5Tokenizer:
    """A T5 (Unigram) tokenizer built offline from a vocabulary of single characters, lowercase letters also with
    SentencePiece's word-start mark; T5's special tokens first (pad 0, eos 1, unk 2)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    pieces += [("\u2581" + c, -2.5) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=pieces, extra_ids=0)


def tiny_t5_encoder(tokenizer: T5Tokenizer) -> T5EncoderModel:
    """A two-layer T5 encoder of width 64 (no dropout) for `tokenizer`."""
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=2 * HIDDEN, d_kv=8, d_ff=64, num_layers=2,
                                   num_heads=4, dropout_rate=0.0, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0))


def tiny_flux_transformer() -> FluxTransformer2DModel:
    """A FLUX transformer at width 32 (one double-stream and one single-stream block, rotary axes 4/4/8 over the
    16-wide heads) that reads 2x2-packed 16-channel latents and an embedded guidance scale, as FLUX.1-dev."""
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=2 * HIDDEN,
                                  pooled_projection_dim=HIDDEN, axes_dims_rope=(4, 4, 8), guidance_embeds=True)


def tiny_sd3_transformer() -> SD3Transformer2DModel:
    """A two-block MMDiT at width 32 with SD3's layout (patch 2, joint text-image attention, pooled conditioning)."""
    return SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=2 * HIDDEN, pooled_projection_dim=2 * HIDDEN)


def tiny_sdxl_unet() -> UNet2DConditionModel:
    """A two-level UNet with SDXL's layout at width 32/64: cross-attention only in the deeper block (two
    transformer layers), linear projections, and the text-and-time added conditioning."""
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        cross_attention_dim=HIDDEN + HIDDEN_2,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED,
        projection_class_embeddings_input_dim=HIDDEN_2 + 6 * TIME_EMBED,
        norm_num_groups=8,
    )


def tiny_text_encoder(tokenizer: CLIPTokenizer, projection: bool = False, gelu: bool = False,
                      width: int = HIDDEN) -> CLIPTextModel:
    """A two-layer CLIP text encoder of `width` whose vocabulary and special ids match `tokenizer` (with a text
    projection, SDXL's second encoder, when `projection`; GELU as OpenCLIP, SD 2.x's encoder, when `gelu`)."""
    config = CLIPTextConfig(
        hidden_act="gelu" if gelu else "quick_gelu",
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=width,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def build_tiny_pipeline(seed: int = 0, sd2: bool = False) -> StableDiffusionPipeline:
    """A tiny SD pipeline with seeded random weights (32x32 images by default); SD 2.x-style (GELU encoder, linear
    projections, v-prediction) when `sd2`."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = tiny_unet(sd2=sd2)
        vae = tiny_vae()
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(tokenizer, gelu=sd2)
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              skip_prk_steps=True, steps_offset=1,
                              prediction_type="v_prediction" if sd2 else "epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def build_tiny_sd2_pipeline(seed: int = 0) -> StableDiffusionPipeline:
    """A tiny SD 2.x-style pipeline (v-prediction) with seeded random weights."""
    return build_tiny_pipeline(seed, sd2=True)


def build_tiny_sdxl_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL pipeline with seeded random weights (32x32 images by default)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = tiny_sdxl_unet()
        vae = tiny_vae()
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(tokenizer)
        text_encoder_2 = tiny_text_encoder(tokenizer, projection=True, gelu=True, width=HIDDEN_2)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tiny_tokenizer(), unet=unet, scheduler=scheduler)


def build_tiny_sd3_pipeline(seed: int = 0) -> StableDiffusion3Pipeline:
    """A tiny SD3 pipeline with seeded random weights (32x32 images by default): two projected CLIP encoders whose
    hidden states side by side are as wide as the T5 encoder's (SD3 pads them to T5's width), and SD3's flow-matching
    scheduler (shift 3)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = tiny_sd3_transformer()
        vae = tiny_vae("sd3")
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(tokenizer, projection=True)
        text_encoder_2 = tiny_text_encoder(tokenizer, projection=True, gelu=True)
        tokenizer_3 = tiny_t5_tokenizer()
        text_encoder_3 = tiny_t5_encoder(tokenizer_3)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                    text_encoder_2=text_encoder_2, tokenizer_2=tiny_tokenizer(),
                                    text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)


def build_tiny_flux_pipeline(seed: int = 0) -> FluxPipeline:
    """A tiny FLUX pipeline with seeded random weights (32x32 images by default) and FLUX.1-dev's scheduler
    settings (dynamic shifting between base shift 0.5 and max shift 1.15)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        transformer = tiny_flux_transformer()
        vae = tiny_vae("flux")
        tokenizer = tiny_tokenizer()
        text_encoder = tiny_text_encoder(tokenizer)
        tokenizer_2 = tiny_t5_tokenizer()
        text_encoder_2 = tiny_t5_encoder(tokenizer_2)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)


TINY_BUILDERS = {TINY_NAME: build_tiny_pipeline, TINY_SD2_NAME: build_tiny_sd2_pipeline,
                 TINY_SDXL_NAME: build_tiny_sdxl_pipeline, TINY_SD3_NAME: build_tiny_sd3_pipeline,
                 TINY_FLUX_NAME: build_tiny_flux_pipeline}


def save_tiny_pipeline(path: str | Path, seed: int = 0, name: str = TINY_NAME) -> Path:
    """Save tiny pipeline `name` in diffusers format (loads with its pipeline class's `from_pretrained`)."""
    path = Path(path)
    TINY_BUILDERS[name](seed).save_pretrained(path)
    return path
