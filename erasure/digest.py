"""Content digests that key caches: tensors, a model's weights, and a JSON-able description of a computation."""
from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import Tensor, nn


def _update(digest: Any, name: str, value: Tensor) -> None:
    tensor = value.detach().cpu().contiguous()
    digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
    digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())


def tensor_digest(tensor: Tensor) -> str:
    """SHA-256 over a tensor's dtype, shape and bytes."""
    digest = hashlib.sha256()
    _update(digest, "", tensor)
    return digest.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over every tensor of the state dict (names, dtypes, shapes and bytes), in state-dict order."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        _update(digest, name, value)
    return digest.hexdigest()


def key_digest(description: dict[str, Any]) -> str:
    """A short, stable name for a JSON-able description (keys sorted; other values by str): 40 hex digits of its
    SHA-256."""
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()[:40]
