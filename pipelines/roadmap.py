"""Commands whose implementation lands with a later issue of the roadmap: they say which one."""
from __future__ import annotations

from typing import Any

from erasure.errors import ErasureError


def erase_sd(config: Any) -> None:
    """`erasure sd`: Stable Diffusion concept erasure."""
    raise ErasureError("`erasure sd` (Stable Diffusion concept erasure) arrives with issue #5 of the roadmap; "
                       "until then use `erasure classifier` and `erasure mask`")


def ddpm(config: Any) -> None:
    """`erasure ddpm train|unlearn`: class-conditional DDPM."""
    raise ErasureError("`erasure ddpm` (class-conditional DDPM on CIFAR-10) arrives with issue #6 of the roadmap; "
                       "until then use `erasure classifier` and `erasure mask`")
