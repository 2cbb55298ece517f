"""The optimizers a training loop may take, by name (no torch import at module level: configs check names)."""
from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from torch import nn

OPTIMIZERS = ("adamw", "adamw8bit")
"""AdamW (torch), or bitsandbytes' AdamW8bit: 8-bit moment states for tensors of 4,096 entries or more (about a
quarter of AdamW's state memory), the same update rule."""


def missing_optimizer_package(name: str) -> str | None:
    """The one-line fix when optimizer `name` needs a package that is not installed, else None."""
    if name == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes (or pick --optimizer adamw)"
    return None


def make_optimizer(name: str, params: list[nn.Parameter], *, lr: float, weight_decay: float
                   ) -> torch.optim.Optimizer:
    """Optimizer `name` (one of OPTIMIZERS) over `params`."""
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    import torch

    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
