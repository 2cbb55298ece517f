"""The one place an `Accelerator` is built, so every domain runs multi-process the same way."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = ("bf16", "fp16", "fp32")


def make_accelerator(**kwargs: Any):
    """An Accelerator whose precision and process count come from `accelerate launch` / `accelerate config`.

    Without CUDA it is built with `cpu=True`, which makes `accelerate launch --multi_gpu --num_processes N`
    start N real gloo processes on a CPU machine (otherwise each process would run alone).
    """
    import torch
    from accelerate import Accelerator

    kwargs.setdefault("cpu", not torch.cuda.is_available())
    return Accelerator(**kwargs)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of 'bf16', 'fp16' or 'fp32'."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def resolve_device(device: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; other names are checked against the hardware."""
    import torch

    from erasure.errors import ErasureError

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ErasureError(f"device '{device}' was asked for but CUDA is not available; pass --device cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 elsewhere (bf16 on CPU is correct but slow)."""
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch_dtype(dtype)


def fsdp_version(accelerator: Any) -> int | None:
    """1 or 2 when Accelerate shards models with FSDP (`accelerate launch --use_fsdp [--fsdp_version 2]`), else None."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return None
    return int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1))  # before accelerate 1.6: FSDP1 only


FSDP2_MIN_ACCELERATE = "1.10"
"""The first Accelerate that maps an optimizer onto a model it had already sharded (DTensor parameters), which
training a mask computed on the shards needs."""


def check_fsdp(accelerator: Any) -> None:
    """Refuse, in one line, an FSDP setup that masked training cannot use: FSDP1 (its flattened parameters have no
    per-weight names for a mask) or FSDP2 under an Accelerate older than FSDP2_MIN_ACCELERATE."""
    import accelerate
    from packaging.version import Version

    from erasure.errors import ConfigError

    version = fsdp_version(accelerator)
    if version == 1:
        raise ConfigError("masked training shards with FSDP2 only: add --fsdp_version 2 to accelerate launch (FSDP1 "
                          "flattens the weights, so a per-weight mask cannot address them)")
    if version == 2 and Version(accelerate.__version__) < Version(FSDP2_MIN_ACCELERATE):
        raise ConfigError(f"FSDP2 training needs accelerate>={FSDP2_MIN_ACCELERATE} (found {accelerate.__version__}):"
                          f" pip install -U 'accelerate>={FSDP2_MIN_ACCELERATE}'")
