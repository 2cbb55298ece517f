"""Diffusers Stable Diffusion 1.x weights -> one state dict in the original (LDM / CompVis) key layout.

AUTOMATIC1111 and ComfyUI load such a file as a checkpoint: the UNet under `model.diffusion_model.`,
the VAE under `first_stage_model.`, the CLIP text encoder under `cond_stage_model.transformer.`.
Our own mapping, written from the layouts (diffusers' convert_diffusers_to_original_stable_diffusion.py
was read to learn them); it follows the model's config (levels, layers per block, which blocks attend),
so it covers SD 1.x at any width, including the tiny test pipeline. Values are copied, never recast;
only the VAE's attention projections are reshaped (linear in diffusers, 1x1 convolutions in LDM).
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from erasure.errors import ErasureError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."

_UNET_FIXED = {
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
    raise SingleFileError(f"UNet key '{key}' has no place in the original layout (not an SD 1.x UNet); "
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


def to_ldm_state_dict(unet: Any, vae: Any, text_encoder: Any) -> dict[str, Tensor]:
    """One state dict in the original Stable Diffusion layout (contiguous CPU tensors, dtypes kept)."""
    if type(text_encoder).__name__ != "CLIPTextModel":
        raise SingleFileError(f"single-file export covers SD 1.x (a CLIPTextModel), not {type(text_encoder).__name__}; "
                              "export this model with --format diffusers instead")
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
    for key, value in text_encoder.state_dict().items():  # transformers >= 5.6 drops the `text_model.` level
        state[TEXT_PREFIX + (key if key.startswith("text_model.") else "text_model." + key)] = value
    return {key: value.detach().cpu().contiguous() for key, value in state.items()}
