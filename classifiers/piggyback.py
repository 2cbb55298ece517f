"""Piggyback masks: a binary mask over some weights, learned by gradient descent on real-valued scores.

Each selected weight w gets a score s; the network runs with w * [s > threshold] and the binarisation
passes its gradient straight through to s (Mallya et al., 2018). An L1 penalty on the scores makes
the mask sparse, so it keeps only the weights the objective cannot do without.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from erasure.errors import ConfigError
from erasure.saliency import Mask


def last_stage(model: nn.Module, pattern: str | None = None) -> list[str]:
    """Names of the weight matrices / kernels a Piggyback mask covers.

    With `pattern`, every weight (dim > 1) whose name matches it; by default the last stage: the
    last two residual blocks of a ResNet-18 (`trunk.6.`), else the last two layers of the trunk.
    """
    weights = [name for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1]
    if pattern is not None:
        chosen = [name for name in weights if re.search(pattern, name)]
    elif getattr(getattr(model, "spec", None), "arch", None) == "resnet18":
        chosen = [name for name in weights if name.startswith("trunk.6.")]
    else:
        chosen = [name for name in weights if name.startswith("trunk.")][-2:]
    if not chosen:
        raise ConfigError(f"no weight of {type(model).__name__} matches piggyback_shrink.params={pattern!r}; "
                          "pass a regex of names from model.named_parameters()")
    return chosen


def _straight_through(scores: Tensor, threshold: float) -> Tensor:
    """[scores > threshold] forward, identity gradient backward."""
    binary = (scores > threshold).to(scores.dtype)
    return scores + (binary - scores).detach()


def learn_mask(model: nn.Module, names: Sequence[str], batches: Sequence[tuple[Tensor, Tensor]], *, penalty: float,
               threshold: float, init: float, lr: float, epochs: int, seed: int) -> Mask:
    """Learn which of the `names` weights `model` needs to fit `batches`: cross-entropy + penalty * sum |s|.

    Only the scores train (Adam); the model's weights and `.grad` fields are left untouched.
    """
    params = dict(model.named_parameters())
    scores = {name: torch.full_like(params[name], init, requires_grad=True) for name in names}
    optimizer = torch.optim.Adam(scores.values(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for i in torch.randperm(len(batches), generator=generator).tolist():
            x, y = batches[i]
            weights = {n: params[n].detach() * _straight_through(s, threshold) for n, s in scores.items()}
            loss = F.cross_entropy(functional_call(model, weights, (x,)), y)
            loss = loss + penalty * torch.stack([s.abs().sum() for s in scores.values()]).sum()
            for s, g in zip(scores.values(), torch.autograd.grad(loss, list(scores.values())), strict=True):
                s.grad = g
            optimizer.step()
    masks = {name: (s.detach() > threshold).cpu() for name, s in scores.items()}
    metadata = {"kind": "piggyback", "penalty": penalty, "threshold": threshold, "init": init, "lr": lr,
                "epochs": epochs, "model_class": type(model).__name__}
    return Mask(masks, metadata)


@torch.no_grad()
def shrink(model: nn.Module, mask: Mask, eta: float) -> None:
    """Multiply every selected weight by `eta`; the rest stay bit-identical."""
    for name, p in model.named_parameters():
        if name in mask:
            p.mul_(torch.where(mask[name].to(p.device), eta, 1.0).to(p.dtype))
