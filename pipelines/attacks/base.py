"""What every attack shares: the models it attacks, the candidates it proposes and what they cost.

An attack is a generator of candidate prompts (`Attack.candidates`). The runner judges each candidate by
generating the erased model's image with the prompt's seed and guidance, and stops the generator at the
first success, so an attack never decides success itself and every attack is judged the same way.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor

from erasure.prompts import Prompt


@dataclass
class Cost:
    """Model calls of one prompt's attack (one UNet call = one image's noise prediction at one step)."""

    unet_calls: int = 0
    unet_backward: int = 0
    text_encoder_calls: int = 0
    images: int = 0
    judge_calls: int = 0
    reused_searches: int = 0
    """Searches read from a cache instead of run (their model calls are counted as if run: the attack's cost)."""

    def add(self, other: Cost) -> None:
        for key, value in asdict(other).items():
            setattr(self, key, getattr(self, key) + value)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class Candidate:
    """A prompt to try: its (1, 77) token ids, their text, and the attack's objective for it (lower is better)."""

    ids: Tensor
    text: str
    objective: float | None = None
    step: int | None = None


@dataclass
class Target:
    """The erased pipeline under attack, the base pipeline and the base model's image of a prompt (both made on
    first use), and the cost counter of the prompt being attacked."""

    pipe: StableDiffusionPipeline
    base: Callable[[], StableDiffusionPipeline]
    reference_image: Callable[[Prompt], np.ndarray]
    cost: Cost = field(default_factory=Cost)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device


class Attack(ABC):
    """One attack: its name, its settings (the config section of its name) and its candidates for a prompt."""

    name: ClassVar[str]

    def __init__(self, settings: Any):
        self.settings = settings

    @classmethod
    def from_config(cls, config: Any, concept: str) -> Attack:
        """The attack with its section of an `AttackEvalConfig` (a method without settings has no section), for
        the erased `concept` as the judge names it."""
        from pipelines.attack_config import ATTACK_SETTINGS

        return cls(getattr(config, cls.name, None) or ATTACK_SETTINGS[cls.name]())

    @abstractmethod
    def candidates(self, target: Target, prompt: Prompt, original: Tensor, generator: torch.Generator
                   ) -> Generator[Candidate, None, None]:
        """Candidate prompts for `prompt` (whose ids are `original`), best last; randomness from `generator`."""

    def check(self, positions: int) -> None:  # noqa: B027 (a hook with nothing to refuse by default)
        """Refuse settings that cannot fit a text encoder of `positions` tokens."""

    def budget(self) -> dict[str, Any]:
        """The settings that bound this attack's work, for the report."""
        return asdict(self.settings)
