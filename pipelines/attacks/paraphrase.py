"""The paraphrase baseline: each prompt as written, no optimisation (the runner judges the original prompt
before any attack, so this attack proposes nothing more). Its ASR is the erased model's pre-attack rate."""
from __future__ import annotations

from collections.abc import Generator

import torch
from torch import Tensor

from erasure.prompts import Prompt
from pipelines.attacks.base import Attack, Candidate, Target


class Paraphrase(Attack):
    """The prompt list as written."""

    name = "paraphrase"

    def candidates(self, target: Target, prompt: Prompt, original: Tensor, generator: torch.Generator
                   ) -> Generator[Candidate, None, None]:
        yield from ()
