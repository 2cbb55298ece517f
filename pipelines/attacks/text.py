"""CLIP text encoding from token ids or from token embeddings (which a gradient can reach).

Stable Diffusion conditions on the text encoder's last hidden state over 77 positions: `<bos>`, the prompt's
tokens, then `<eos>` repeated (the pad token of SD's tokenizer, and the one the attack references set).
`encode_embeddings` runs the same encoder from embedding vectors instead of ids, so an attack can optimise
a distribution over the vocabulary (UnlearnDiffAtk) and still condition the UNet exactly as ids would.
"""
from __future__ import annotations

import torch
from torch import Tensor
from transformers import CLIPTextModel, CLIPTokenizer


def token_ids(tokenizer: CLIPTokenizer, text: str) -> Tensor:
    """The (1, 77) ids of `text`: `<bos>`, its tokens (truncated to fit), `<eos>` padding."""
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return torch.where(ids == tokenizer.pad_token_id, tokenizer.eos_token_id, ids)


def content_length(ids: Tensor, tokenizer: CLIPTokenizer) -> int:
    """How many tokens lie between `<bos>` and the first `<eos>` of one (1, 77) id row."""
    return int((ids[0] == tokenizer.eos_token_id).nonzero()[0]) - 1


def decode(tokenizer: CLIPTokenizer, ids: Tensor) -> str:
    """The text of an id row without its special tokens (what a user would type to reproduce it)."""
    special = set(tokenizer.all_special_ids)
    return tokenizer.decode([i for i in ids.flatten().tolist() if i not in special]).strip()


def vocabulary(text_encoder: CLIPTextModel) -> Tensor:
    """The token embedding table (vocabulary x width)."""
    return _text_model(text_encoder).embeddings.token_embedding.weight


def encode_ids(text_encoder: CLIPTextModel, ids: Tensor) -> Tensor:
    """Last hidden states (N, 77, width) of id rows: the UNet's conditioning."""
    return text_encoder(ids.to(text_encoder.device))[0]


def encode_embeddings(text_encoder: CLIPTextModel, embeddings: Tensor) -> Tensor:
    """Last hidden states of token embeddings (N, 77, width), with positions and causal masking as for ids."""
    model = _text_model(text_encoder)
    hidden = model.embeddings(inputs_embeds=embeddings)
    length = hidden.shape[1]
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device, dtype=hidden.dtype)
    causal = causal.triu(1)[None, None].expand(hidden.shape[0], 1, length, length)
    hidden = model.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state
    return model.final_layer_norm(hidden)


def _text_model(text_encoder: CLIPTextModel) -> torch.nn.Module:
    """The module holding embeddings, encoder and final norm (transformers 5 flattened `text_model` away)."""
    return getattr(text_encoder, "text_model", text_encoder)
