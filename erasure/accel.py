"""The one place an `Accelerator` is built, so every domain runs multi-process the same way."""
from __future__ import annotations

from typing import Any


def make_accelerator(**kwargs: Any):
    """An Accelerator whose precision and process count come from `accelerate launch` / `accelerate config`.

    Without CUDA it is built with `cpu=True`, which makes `accelerate launch --multi_gpu --num_processes N`
    start N real gloo processes on a CPU machine (otherwise each process would run alone).
    """
    import torch
    from accelerate import Accelerator

    kwargs.setdefault("cpu", not torch.cuda.is_available())
    return Accelerator(**kwargs)
