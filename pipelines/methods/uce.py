"""UCE, Unified Concept Editing (Gandikota et al., WACV 2024): a closed-form edit of the cross-attention key and
value projections, no images and no training.

Reference: rohitgandikota/unified-concept-editing, `train-scripts/train_erase.py` (`edit_model`). For every
`attn2.to_k` / `attn2.to_v` weight W, with c_i the erased concepts' token embeddings, v*_i their targets' outputs
W c*_i, and c_j the preserved prompts' embeddings:

    W' = (lamb W + erase_scale sum_i v*_i c_i^T + preserve_scale sum_j W c_j c_j^T)
         (lamb I + erase_scale sum_i c_i c_i^T + preserve_scale sum_j c_j c_j^T)^-1,

the minimiser of erase_scale sum_i |W' c_i - v*_i|^2 + preserve_scale sum_j |W' c_j - W c_j|^2 + lamb |W' - W|_F^2.
A concept's token embeddings are the text encoder's last hidden states from its last word token to the end of
the 77 (the end token and the padding that carry the prompt's meaning), aligned with its target's by dropping the
longer one's tail; a preserved prompt contributes all 77, and the empty prompt is always preserved
(`retain_texts = [''] + preserve_concepts`). All concepts are solved together. Defaults as the paper's script
(at 35e91e2) runs it: lamb 0.5 (its `main`; `edit_model`'s own default is 0.1), erase_scale 1, preserve_scale
max(0.1, 1 / number of preserved prompts, the empty one included), technique 'replace', an empty target encoded
as ' '. Departure: the solve runs in float64 (the reference: float32 `torch.inverse`), so the closed form holds
to rounding. The repository's 2025 rewrite (`trainscripts/uce_sd_erase.py`: one last-token vector per prompt,
lamb 0.5, preserve_scale 1) is not what the paper measured.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from erasure.config import option
from pipelines.methods.base import CROSS_ATTENTION_KEY_VALUE, EDIT, MethodSpec

if TYPE_CHECKING:
    from torch import Tensor, nn

TECHNIQUES = ("replace", "tensor")


@dataclass
class UCESettings:
    """UCE's closed-form weights."""

    lamb: float = option(0.5, "weight of staying at the original projection (lamb |W' - W|^2)", ge=0)
    erase_scale: float = option(1.0, "weight of mapping each concept to its target", gt=0)
    preserve_scale: float | None = option(None, "weight of keeping each preserved prompt (default: max(0.1, "
                                                "1 / number of preserved prompts with the empty one), as the "
                                                "reference)", ge=0)
    technique: str = option("replace", "target of a concept: 'replace' (the target prompt's output) or 'tensor' "
                                       "(that output minus its projection on the concept's)", choices=TECHNIQUES)
    keys: bool = option(True, "edit the key projections too (the reference's with_to_k), not only the values")


class UCE:
    """The closed-form edit."""

    def __init__(self, settings: UCESettings) -> None:
        self.settings = settings
        self.scope = CROSS_ATTENTION_KEY_VALUE

    def edit(self, pipe: Any, concepts: list[tuple[str, str]], preserve: list[str]) -> dict[str, Any]:
        erase = [aligned_tokens(pipe, forget, target) for forget, target in concepts]
        kept = [full_tokens(pipe, text) for text in dict.fromkeys(["", *preserve])]
        scale = self.settings.preserve_scale
        if scale is None:
            scale = max(0.1, 1 / len(kept))
        layers = edited_layers(pipe.unet, self.settings.keys)
        residuals = [edit_layer(layer, erase, kept, self.settings, scale) for layer in layers.values()]
        return {"edited_layers": len(layers), "preserve_scale": scale,
                "mean_target_residual": sum(residuals) / len(residuals)}


def edited_layers(unet: nn.Module, keys: bool) -> dict[str, nn.Linear]:
    """The cross-attention value (and key) projections of a UNet, by module name."""
    return {name: module for name, module in unet.named_modules()
            if CROSS_ATTENTION_KEY_VALUE.includes(name + ".") and (keys or ".to_v" in name + ".")}


def aligned_tokens(pipe: Any, text: str, target: str) -> tuple[Tensor, Tensor]:
    """The token states UCE edits (SD: the last hidden states; SDXL: both encoders' penultimate ones, what its
    cross-attention reads): each prompt's from its last word token to the end,
    both cut to the same count (the reference's `final_token_idx` alignment); an empty prompt is ' '."""
    from pipelines.families import text_conditioning

    hidden, attention = text_conditioning(pipe).token_states([text or " ", target or " "])
    last = [int(m.sum()) - 2 for m in attention]
    farthest = max(last)
    cut = [hidden[i, last[i]:hidden.shape[1] - (farthest - last[i])] for i in range(2)]
    return cut[0], cut[1]


def full_tokens(pipe: Any, text: str) -> Tensor:
    """All 77 token states of a prompt, as written ('' is the empty prompt)."""
    from pipelines.families import text_conditioning

    return text_conditioning(pipe).token_states([text])[0][0]


def edit_layer(layer: nn.Linear, erase: list[tuple[Tensor, Tensor]], kept: list[Tensor], settings: UCESettings,
               preserve_scale: float) -> float:
    """Replace `layer.weight` by UCE's closed form; returns the relative residual |W' c - v*| / |v*| over the
    erased tokens."""
    import torch

    weight = layer.weight.detach().double()
    eye = torch.eye(weight.shape[1], dtype=torch.float64, device=weight.device)
    lhs, rhs = settings.lamb * weight, settings.lamb * eye
    contexts, values = [], []
    for concept, target in erase:
        c, c_new = concept.double().to(weight.device), target.double().to(weight.device)
        value = c_new @ weight.T
        if settings.technique == "tensor":
            old = c @ weight.T
            unit = old / old.norm()
            value = value - (unit * value).sum() * unit
        lhs = lhs + settings.erase_scale * value.T @ c
        rhs = rhs + settings.erase_scale * c.T @ c
        contexts.append(c)
        values.append(value)
    for tokens in kept:
        c = tokens.double().to(weight.device)
        lhs = lhs + preserve_scale * (c @ weight.T).T @ c
        rhs = rhs + preserve_scale * c.T @ c
    edited = torch.linalg.solve(rhs.T, lhs.T).T  # lhs @ rhs^-1
    with torch.no_grad():
        layer.weight.copy_(edited.to(layer.weight.dtype))
    c, v = torch.cat(contexts), torch.cat(values)
    return float((c @ edited.T - v).norm() / v.norm().clamp_min(1e-12))


SPEC = MethodSpec(
    name="uce", summary="closed-form edit of the cross-attention keys and values (seconds, no images)",
    source="Gandikota et al. 2024, rohitgandikota/unified-concept-editing train-scripts/train_erase.py", kind=EDIT,
    settings=UCESettings, build=UCE)
