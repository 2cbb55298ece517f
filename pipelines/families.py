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

The transformer families (SD3, FLUX) condition a different denoiser (`SD3Transformer2DModel`,
`FluxTransformer2DModel`) with flow matching; they are refused by name when loading, with this list.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from pipelines.objectives import Predict

FAMILIES = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl"}
"""The pipeline classes `erasure` loads (model_index.json's `_class_name`), by family."""
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


def text_conditioning(pipe: Any, resolution: int | None = None) -> TextConditioning:
    """The conditioning of `pipe`'s family; SDXL's time ids use `resolution` (default: the UNet's native size)."""
    if family_of(pipe) == "sdxl":
        return SDXLConditioning(pipe, resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor)
    return TextConditioning(pipe)


def family_of(pipe: Any) -> str:
    """'sd' or 'sdxl', from the pipeline's class."""
    return FAMILIES[type(pipe).__name__]


def _tokenize(tokenizer: Any, prompts: list[str]) -> Any:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt")
