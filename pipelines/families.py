"""Model families: how a pipeline's text conditions its UNet, behind one interface the erasure loop uses.

Everywhere in the loop a condition is one float32 tensor per prompt that is indexed, concatenated and expanded
like a text embedding, and `predictor(unet)(x_t, t, condition)` unpacks it for the UNet:
- `sd` (SD 1.x, 2.x; `StableDiffusionPipeline`): the text encoder's last hidden states, (P, 77, D).
- `sdxl` (`StableDiffusionXLPipeline`): the two encoders' penultimate hidden states side by side, as SDXL's
  cross-attention reads them, plus one more row that carries the UNet's added conditions: the second encoder's
  pooled projection and the six time ids (original size, crop corner, target size, all at the training
  resolution): (P, 78, D). The empty prompt is all zeros when the pipeline has `force_zeros_for_empty_prompt`
  (SDXL base), since that is the unconditional branch its classifier-free guidance uses.
`token_states` gives the per-token states a cross-attention edit (UCE, RECE) works on: the rows the keys and
values project, without the added-conditions row.

- `sd3` (`StableDiffusion3Pipeline`): the prompt embeddings `encode_prompt` makes (both CLIP encoders' penultimate
  states side by side, padded to T5's width, then the T5 states along the sequence; zeros when the pipeline has no
  T5), plus one row carrying the pooled projections of both CLIP encoders: (P, 77 + 256 + 1, D). Its denoiser is
  an `SD3Transformer2DModel` (`pipe.transformer`, saved as `transformer/`), trained by flow matching
  (`pipelines.objectives`). Its attention is joint (text and image tokens attend together), so there is no
  cross-attention for a closed-form edit (UCE, RECE): it is not in EDITABLE.

- `flux` (`FluxPipeline`): `encode_prompt`'s T5 states plus one row carrying the CLIP pooled vector: (P, 512 + 1,
  D). Its denoiser is a `FluxTransformer2DModel` (`pipe.transformer`) that reads 2x2-packed latents with rotary
  image ids, zero text ids, sigma (not sigma x 1000) as its timestep and, for guidance-distilled models
  (FLUX.1-dev), an embedded guidance scale: `predictor` packs and unpacks, so the loop sees ordinary (B, C, H, W)
  latents. Its attention is joint too (no closed-form edits).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipelines.objectives import Predict

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3",
            "FluxPipeline": "flux"}
"""The pipeline classes `erasure` loads (model_index.json's `_class_name`), by family."""
EDITABLE = ("sd", "sdxl")
"""The families with cross-attention reading the text encoder's states, which UCE and RECE edit in closed form."""
FLOW_MATCHING = ("sd3", "flux")
"""The families trained and sampled by flow matching."""
FLUX_TRAINING_GUIDANCE = 3.5
"""The guidance scale a guidance-distilled FLUX transformer is trained with: diffusers' FLUX fine-tuning default."""
TIME_IDS = 6


class TextConditioning:
    """SD 1.x / 2.x: a prompt's condition is its CLIP last hidden states."""

    family = "sd"

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.pipe.text_encoder]

    def encode(self, prompts: list[str]) -> Tensor:
        """float32 conditions (P, L, D) of `prompts`."""
        return self.token_states(prompts)[0]

    def token_states(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """float32 per-token states (P, 77, D) the cross-attention reads, and the first tokenizer's attention
        mask (P, 77)."""
        tokens = _tokenize(self.pipe.tokenizer, prompts)
        encoder = self.pipe.text_encoder
        with torch.no_grad():
            return encoder(tokens.input_ids.to(encoder.device))[0].float(), tokens.attention_mask

    def predictor(self, unet: nn.Module) -> Predict:
        """`predict(x_t, t, condition) -> prediction` for a UNet2DConditionModel (wrapped or not)."""
        return lambda x_t, t, condition: unet(x_t, t, encoder_hidden_states=condition).sample

    def text_width(self) -> int:
        """The width of the token states (the UNet's cross_attention_dim must match it)."""
        return self.pipe.text_encoder.config.hidden_size


class SDXLConditioning(TextConditioning):
    """SDXL: both encoders' penultimate hidden states, plus a row carrying the pooled embedding and time ids."""

    family = "sdxl"

    def __init__(self, pipe: Any, resolution: int) -> None:
        super().__init__(pipe)
        self.time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    @property
    def pooled_width(self) -> int:
        return self.pipe.text_encoder_2.config.projection_dim

    def encode(self, prompts: list[str]) -> Tensor:
        hidden, pooled = self._encode(prompts)
        extra = hidden.new_zeros(len(prompts), 1, hidden.shape[-1])
        extra[:, 0, :self.pooled_width] = pooled
        extra[:, 0, self.pooled_width:self.pooled_width + TIME_IDS] = self.time_ids
        condition = torch.cat([hidden, extra], dim=1)
        if self.pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([not text for text in prompts])
            condition[empty, :-1] = 0
            condition[empty, -1, :self.pooled_width] = 0
        return condition

    def token_states(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        hidden, _ = self._encode(prompts)
        return hidden, _tokenize(self.pipe.tokenizer, prompts).attention_mask

    def _encode(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        """(hidden (P, 77, D1 + D2), pooled (P, D2)) as `StableDiffusionXLPipeline.encode_prompt` makes them:
        each encoder's penultimate hidden states, and the second encoder's projected pooled output."""
        states, pooled = [], None
        for tokenizer, encoder in ((self.pipe.tokenizer, self.pipe.text_encoder),
                                   (self.pipe.tokenizer_2, self.pipe.text_encoder_2)):
            tokens = _tokenize(tokenizer, prompts)
            with torch.no_grad():
                out = encoder(tokens.input_ids.to(encoder.device), output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # the last encoder's (CLIPTextModelWithProjection) text_embeds
        return torch.cat(states, dim=-1), pooled

    def predictor(self, unet: nn.Module) -> Predict:
        width = self.pooled_width

        def predict(x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
            extra = condition[:, -1]
            added = {"text_embeds": extra[:, :width], "time_ids": extra[:, width:width + TIME_IDS]}
            return unet(x_t, t, encoder_hidden_states=condition[:, :-1], added_cond_kwargs=added).sample

        return predict

    def text_width(self) -> int:
        return self.pipe.text_encoder.config.hidden_size + self.pipe.text_encoder_2.config.hidden_size


class SD3Conditioning(TextConditioning):
    """SD3: `encode_prompt`'s joint CLIP + T5 sequence, plus a row carrying the pooled CLIP projections."""

    family = "sd3"

    @property
    def text_encoders(self) -> list[nn.Module]:
        encoders = [self.pipe.text_encoder, self.pipe.text_encoder_2, self.pipe.text_encoder_3]
        return [encoder for encoder in encoders if encoder is not None]

    @property
    def pooled_width(self) -> int:
        return self.pipe.transformer.config.pooled_projection_dim

    def encode(self, prompts: list[str]) -> Tensor:
        device = self.pipe.text_encoder.device
        with torch.no_grad():
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None,
                                                           device=device, do_classifier_free_guidance=False)
        return self._with_pooled_row(embeds, pooled)

    def _with_pooled_row(self, embeds: Tensor, pooled: Tensor) -> Tensor:
        """float32 (P, L + 1, D): the sequence, then a row whose first entries carry the pooled vector."""
        extra = embeds.new_zeros(len(embeds), 1, embeds.shape[-1])
        extra[:, 0, :self.pooled_width] = pooled
        return torch.cat([embeds, extra], dim=1).float()

    def token_states(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        raise ValueError(f"{self.family.upper()}'s joint attention has no cross-attention to edit in closed form")

    def predictor(self, transformer: nn.Module) -> Predict:
        width = self.pooled_width

        def predict(x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
            pooled = condition[:, -1, :width]
            return transformer(hidden_states=x_t, timestep=t.expand(x_t.shape[0]),
                               encoder_hidden_states=condition[:, :-1], pooled_projections=pooled).sample

        return predict

    def text_width(self) -> int:
        return self.pipe.transformer.config.joint_attention_dim


class FluxConditioning(SD3Conditioning):
    """FLUX: `encode_prompt`'s T5 sequence plus a row carrying the CLIP pooled vector; packed latents."""

    family = "flux"

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [self.pipe.text_encoder, self.pipe.text_encoder_2]

    def encode(self, prompts: list[str]) -> Tensor:
        with torch.no_grad():
            embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None,
                                                        device=self.pipe.text_encoder.device)
        return self._with_pooled_row(embeds, pooled)

    def predictor(self, transformer: nn.Module) -> Predict:
        width = self.pooled_width
        guided = self.pipe.transformer.config.guidance_embeds  # `transformer` may be DDP-wrapped

        def predict(x_t: Tensor, t: Tensor, condition: Tensor) -> Tensor:
            batch, channels, height, width_ = x_t.shape
            packed = x_t.view(batch, channels, height // 2, 2, width_ // 2, 2).permute(0, 2, 4, 1, 3, 5)
            image_ids = torch.zeros(height // 2, width_ // 2, 3)
            image_ids[..., 1] += torch.arange(height // 2)[:, None]
            image_ids[..., 2] += torch.arange(width_ // 2)[None, :]
            text = condition[:, :-1]
            guidance = torch.full((batch,), FLUX_TRAINING_GUIDANCE, device=x_t.device) if guided else None
            out = transformer(hidden_states=packed.reshape(batch, -1, channels * 4),
                              timestep=t.expand(batch).to(x_t.dtype) / 1000, guidance=guidance,
                              pooled_projections=condition[:, -1, :width], encoder_hidden_states=text,
                              txt_ids=text.new_zeros(text.shape[1], 3),
                              img_ids=image_ids.reshape(-1, 3).to(x_t)).sample
            out = out.view(batch, height // 2, width_ // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
            return out.reshape(batch, channels, height, width_)

        return predict


def text_conditioning(pipe: Any, resolution: int | None = None) -> TextConditioning:
    """The conditioning of `pipe`'s family; SDXL's time ids use `resolution` (default: the UNet's native size)."""
    family = family_of(pipe)
    if family == "sdxl":
        return SDXLConditioning(pipe, resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    if family == "sd3":
        return SD3Conditioning(pipe)
    if family == "flux":
        return FluxConditioning(pipe)
    return TextConditioning(pipe)


def family_of(pipe: Any) -> str:
    """'sd', 'sdxl', 'sd3' or 'flux', from the pipeline's class."""
    return FAMILIES[type(pipe).__name__]


def denoiser_name(pipe: Any) -> str:
    """The pipeline attribute (and a run's folder) of the trained denoiser: 'transformer' (SD3, FLUX) or 'unet'."""
    return "transformer" if getattr(pipe, "transformer", None) is not None else "unet"


def denoiser(pipe: Any) -> nn.Module:
    """The pipeline's denoiser: its UNet, or its transformer for SD3 and FLUX."""
    return getattr(pipe, denoiser_name(pipe))


def _tokenize(tokenizer: Any, prompts: list[str]) -> Any:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")
