"""Diagonal Fisher importances and selective synaptic dampening (SSD, Foster et al., 2024)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from erasure.saliency import Mask


def fisher_diagonal(model: nn.Module, batches: Sequence[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """The mean over `batches` of the squared gradient of each batch's mean cross-entropy, per parameter."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    totals = {name: torch.zeros_like(p) for name, p in named}
    for x, y in batches:
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), [p for _, p in named])
        for (name, _), g in zip(named, grads, strict=True):
            totals[name].add_(g.square())
    return {name: t / len(batches) for name, t in totals.items()}


@torch.no_grad()
def dampen(model: nn.Module, forget: dict[str, Tensor], full: dict[str, Tensor], *, alpha: float,
           strength: float) -> Mask:
    """Scale each weight with forget importance > alpha * full importance by min(strength * full / forget, 1).

    Returns the mask of the dampened weights.
    """
    selected = {}
    for name, p in model.named_parameters():
        if name not in forget:
            continue
        chosen = forget[name] > alpha * full[name]
        factor = (strength * full[name] / forget[name].clamp_min(torch.finfo(p.dtype).tiny)).clamp_max(1.0)
        p.mul_(torch.where(chosen, factor, 1.0))
        selected[name] = chosen.cpu()
    return Mask(selected, {"kind": "ssd", "alpha": alpha, "lambda": strength, "model_class": type(model).__name__})
