"""Diffusers Stable Diffusion 1.x / 2.x / XL weights -> one state dict in the original (LDM / CompVis / SGM) layout.

AUTOMATIC1111 and ComfyUI load such a file as a checkpoint: the UNet under `model.diffusion_model.` (SDXL's added
conditioning as `label_emb`), the VAE under `first_stage_model.`, the text encoders under `cond_stage_model.`
(SD 1.x, 2.x) or `conditioner.embedders.0/1.` (SDXL). OpenAI CLIP is written as transformers names it (SD 1.x,
SDXL's first encoder); OpenCLIP (SD 2.x, SDXL's second encoder) in open_clip's own layout (`resblocks`, fused
`in_proj` attention, `text_projection` when the encoder has one). SD 1.x and 2.x are told apart by the encoder's
activation: OpenAI CLIP uses QuickGELU, OpenCLIP GELU. An encoder is stored with the layers diffusers keeps (SD
2.x's last OpenCLIP layer, never used, is not among them).
Our own mapping, written from the layouts (diffusers' convert_diffusers_to_original_stable_diffusion.py
was read to learn them); it follows the model's config (levels, layers per block, which blocks attend),
so it covers every width, including the tiny test pipelines. Values are copied, never recast;
only the VAE's attention projections are reshaped (linear in diffusers, 1x1 convolutions in LDM).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from erasure.errors import ErasureError

SINGLE_FILE_FAMILIES = ("sd", "sdxl")
"""The families with an original single-file (LDM / SGM) layout written here."""
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."
SDXL_PREFIXES = ("conditioner.embedders.0.", "conditioner.embedders.1.")
_OPEN_CLIP_LAYER = {"layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
                    "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj."}
_OPEN_CLIP_FIXED = {"embeddings.token_embedding.weight": "token_embedding.weight",
                    "embeddings.position_embedding.weight": "positional_embedding",
                    "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}

_UNET_FIXED = {
    "add_embedding.linear_1.": "label_emb.0.0.",  # SDXL's added text-and-time conditioning
    "add_embedding.linear_2.": "label_emb.0.2.",
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}
_UNET_RESNET = {"norm1.": "in_layers.0.", "conv1.": "in_layers.2.", "norm2.": "out_layers.0.",
                "conv2.": "out_layers.3.", "time_emb_proj.": "emb_layers.1.", "conv_shortcut.": "skip_connection."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}


class SingleFileError(ErasureError):
    """A pipeline cannot be written in the original Stable Diffusion layout."""


def unet_key_map(config: Mapping[str, Any], keys: list[str]) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> LDM key (without the `model.diffusion_model.` prefix)."""
    per_level = config["layers_per_block"]
    if not isinstance(per_level, int):
        raise SingleFileError("single-file export needs one layers_per_block for every level (SD 1.x); "
                              "export this model with --format diffusers instead")
    attends_up = ["CrossAttn" in kind for kind in config["up_block_types"]]
    prefixes: dict[str, str] = dict(_UNET_FIXED)
    for level in range(len(config["down_block_types"])):
        for j in range(per_level):
            slot = 1 + level * (per_level + 1) + j
            prefixes[f"down_blocks.{level}.resnets.{j}."] = f"input_blocks.{slot}.0."
            prefixes[f"down_blocks.{level}.attentions.{j}."] = f"input_blocks.{slot}.1."
        prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = f"input_blocks.{(level + 1) * (per_level + 1)}.0.op."
    for level, attends in enumerate(attends_up):
        for j in range(per_level + 1):
            slot = level * (per_level + 1) + j
            prefixes[f"up_blocks.{level}.resnets.{j}."] = f"output_blocks.{slot}.0."
            prefixes[f"up_blocks.{level}.attentions.{j}."] = f"output_blocks.{slot}.1."
        prefixes[f"up_blocks.{level}.upsamplers.0."] = f"output_blocks.{level * (per_level + 1) + per_level}." \
                                                       f"{2 if attends else 1}."
    prefixes["mid_block.attentions.0."] = "middle_block.1."
    for j in range(2):
        prefixes[f"mid_block.resnets.{j}."] = f"middle_block.{2 * j}."
    return {key: _rename_unet(key, prefixes) for key in keys}


def _rename_unet(key: str, prefixes: Mapping[str, str]) -> str:
    for old, new in prefixes.items():
        if key.startswith(old):
            rest = key[len(old):]
            if ".resnets." in old:
                rest = _replace_head(rest, _UNET_RESNET)
            return new + rest
    raise SingleFileError(f"UNet key '{key}' has no place in the original layout (not an SD 1.x/2.x/XL UNet); "
                          "export this model with --format diffusers instead")


def vae_key_map(keys: list[str], levels: int) -> dict[str, str]:
    """diffusers AutoencoderKL key -> LDM key (without the `first_stage_model.` prefix)."""
    mapping = {}
    for key in keys:
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", key)
        new = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.block.", new)
        new = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{levels - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new)
        new = new.replace(".conv_norm_out.", ".norm_out.")
        if ".mid_block.attentions.0." in new:
            head, rest = new.split(".mid_block.attentions.0.")
            new = f"{head}.mid.attn_1.{_replace_head(rest, _VAE_ATTENTION)}"
        new = new.replace(".conv_shortcut.", ".nin_shortcut.")
        mapping[key] = new
    return mapping


def _replace_head(rest: str, table: Mapping[str, str]) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    return rest


def to_ldm_state_dict(pipe: Any) -> dict[str, Tensor]:
    """A pipeline's UNet, VAE and text encoders in one state dict of the original layout (contiguous CPU tensors,
    dtypes kept): SD 1.x / 2.x, or SDXL (`conditioner.embedders.0` CLIP, `.1` OpenCLIP with its projection)."""
    encoders = [pipe.text_encoder, *([pipe.text_encoder_2] if getattr(pipe, "text_encoder_2", None) else [])]
    for encoder in encoders:
        if type(encoder).__name__ not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise SingleFileError(f"single-file export covers CLIP text encoders, not {type(encoder).__name__}; "
                                  "export this model with --format diffusers instead")
    unet, vae = pipe.unet, pipe.vae
    state: dict[str, Tensor] = {}
    unet_state = unet.state_dict()
    for old, new in unet_key_map(unet.config, list(unet_state)).items():
        state[UNET_PREFIX + new] = unet_state[old]
    vae_state = vae.state_dict()
    for old, new in vae_key_map(list(vae_state), len(vae.config.block_out_channels)).items():
        value = vae_state[old]
        if ".mid.attn_1." in new and new.endswith("weight") and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        state[VAE_PREFIX + new] = value
    if len(encoders) == 2:
        state.update(clip_state(encoders[0], SDXL_PREFIXES[0] + "transformer."))
        state.update(open_clip_state(encoders[1], SDXL_PREFIXES[1] + "model."))
    elif encoders[0].config.hidden_act == "gelu":
        state.update(open_clip_state(encoders[0], OPEN_CLIP_PREFIX))
    else:
        state.update(clip_state(encoders[0], TEXT_PREFIX))
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}


def _text_state(encoder: Any) -> dict[str, Tensor]:
    """An encoder's transformer weights without the `text_model.` level (transformers >= 5.6 drops it for
    CLIPTextModel; CLIPTextModelWithProjection keeps it, beside `text_projection`)."""
    return {key.removeprefix("text_model."): value for key, value in encoder.state_dict().items()}


def clip_state(encoder: Any, prefix: str) -> dict[str, Tensor]:
    """OpenAI CLIP as transformers names it, under `prefix` + `text_model.`."""
    return {prefix + "text_model." + key: value for key, value in _text_state(encoder).items()}


def open_clip_state(encoder: Any, prefix: str) -> dict[str, Tensor]:
    """A CLIP text encoder in open_clip's layout under `prefix`: q, k and v fused into `in_proj` in that order, the
    rest renamed; a projection is stored as open_clip's `text_projection` (x @ P, so the transposed weight)."""
    text_state = _text_state(encoder)
    state = {prefix + new: text_state[old] for old, new in _OPEN_CLIP_FIXED.items()}
    if "text_projection.weight" in text_state:
        state[prefix + "text_projection"] = text_state["text_projection.weight"].T
    layers = sorted({int(key.split(".")[2]) for key in text_state if key.startswith("encoder.layers.")})
    for i in layers:
        old, new = f"encoder.layers.{i}.", f"{prefix}transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            state[f"{new}attn.in_proj_{kind}"] = torch.cat([text_state[f"{old}self_attn.{p}_proj.{kind}"]
                                                            for p in ("q", "k", "v")])
            for part, renamed in _OPEN_CLIP_LAYER.items():
                state[f"{new}{renamed}{kind}"] = text_state[f"{old}{part}{kind}"]
    return state
