"""Export only what an erasure changed, and apply it to a base pipeline the user already has.

The file holds, for every UNet tensor that differs from the base, its erased value (whole tensor,
original dtype). Storing values rather than differences makes applying exact: base + (erased - base)
is not always bit-equal to erased in floating point, a copy is. Metadata names the base model.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from erasure.errors import ErasureError
from erasure.io import atomic_path

FORMAT = "erasure-unet-delta/v1"


class DeltaError(ErasureError):
    """A delta file cannot be read or does not fit the UNet it is applied to."""


def changed_tensors(base: Mapping[str, Tensor], erased: nn.Module) -> dict[str, Tensor]:
    """The erased model's state tensors that are not bit-equal to `base` (on the CPU, contiguous)."""
    changed = {}
    for name, value in erased.state_dict().items():
        value = value.detach().cpu()
        if name not in base or not torch.equal(base[name], value):
            changed[name] = value.contiguous()
    return changed


def export_delta(base: Mapping[str, Tensor], erased: nn.Module, path: str | Path, *,
                 base_model: str) -> dict[str, Any]:
    """Write the tensors of `erased` that differ from the `base` state dict; returns a summary."""
    changed = changed_tensors(base, erased)
    entries = sum(int(torch.count_nonzero(value != base[name])) if name in base else value.numel()
                  for name, value in changed.items())
    summary = {"format": FORMAT, "base_model": base_model, "tensors": len(changed),
               "tensors_total": len(base), "entries_changed": entries}
    with atomic_path(path) as tmp:
        save_file(changed, str(tmp), metadata={"erasure": json.dumps(summary)})
    return summary


def read_delta(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The tensors and summary of a delta file."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            names = handle.keys()
            tensors = {name: handle.get_tensor(name) for name in names}
            metadata = (handle.metadata() or {}).get("erasure")
    except (SafetensorError, FileNotFoundError, OSError) as exc:
        raise DeltaError(f"cannot read delta file '{path}' ({exc}); "
                         "pass the delta.safetensors of an `erasure sd` run") from None
    if metadata is None or json.loads(metadata).get("format") != FORMAT:
        raise DeltaError(f"'{path}' is not an erasure delta ({FORMAT}); "
                         "pass the delta.safetensors of an `erasure sd` run")
    return tensors, json.loads(metadata)


def apply_delta(target: Any, path: str | Path) -> nn.Module:
    """Overwrite the changed tensors of a denoiser (or of a pipeline's UNet or SD3 transformer) in place; returns
    the denoiser."""
    from pipelines.families import denoiser

    unet = denoiser(target) if hasattr(target, "vae") else target
    tensors, summary = read_delta(path)
    state = unet.state_dict()
    wrong = [name for name, value in tensors.items() if name not in state or state[name].shape != value.shape]
    if wrong:
        raise DeltaError(f"the delta does not fit this UNet ({len(wrong)} tensors missing or reshaped, e.g. "
                         f"{wrong[0]}); apply it to the base model it was made from ({summary['base_model']})")
    with torch.no_grad():
        for name, value in tensors.items():
            state[name].copy_(value.to(state[name].dtype))
    return unet
