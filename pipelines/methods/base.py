"""The seam every diffusion erasure method plugs into: its description (`MethodSpec`), the two kinds of method
(trained by the shared masked loop, or a one-shot weight edit) and what a method may ask of the run (`Session`).

A method is one module in this package: its settings dataclass, its `MethodSpec` and its implementation. The
module imports nothing heavy at the top (torch-side helpers are imported inside its functions) so that the
registry, `--method` choices and `--help` stay fast. Objectives see the model only through
`predict(x_t, t, condition)` callables, so they do not care whether a condition is a text embedding (Stable
Diffusion) or a class label (DDPM).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch
    from torch import Tensor

TRAINED, EDIT = "trained", "edit"
IMAGE_SETS = ("forget", "retain", "anchor")
"""Image sets a trained method can ask for: forget (generated from the forget prompts), retain (from the retain
and preserve prompts) and anchor (from each concept's target prompt)."""


@dataclass
class Chunk:
    """Rows of one UNet forward pass, with the target and loss weight of their squared error, reduced as
    `pipelines.objectives.squared_error` says ('mean', or 'sum' per sample then the batch mean)."""

    x_t: Tensor
    t: Tensor
    condition: Any
    target: Tensor
    weight: float
    reduction: str = "mean"


@dataclass(frozen=True)
class Draw:
    """Which rows of which global batch a chunk is for: the step (seeds its images), the noise generator, this
    rank's rows of the `total` rows, the stream its images are drawn from, and the generator of their VAE
    posterior samples (None: posterior means)."""

    step: int
    noise: torch.Generator
    rows: slice
    total: int
    stream: int
    posterior: torch.Generator | None = None


class Session(Protocol):
    """What a run offers a trained method (Stable Diffusion's `Eraser` implements it)."""

    scheduler: Any
    concepts: int
    latent_shape: tuple[int, ...]
    reduction: str
    """How this domain's reference reduces a diffusion loss: 'mean' (SD's scripts) or 'sum' (the DDPM's)."""

    def images(self, name: str, draw: Draw) -> tuple[Tensor, Tensor]:
        """x0 of this draw's rows from image set `name`, and the concept index of each row."""

    def condition(self, role: str, concept: Tensor) -> Any:
        """The conditions of `concept` rows: role 'forget' (the concept's prompt or class), 'target' (its remap or
        anchor prompt or class), 'null' (the empty prompt or null class) or, for class-conditional models,
        'other' (a random other class per row)."""

    def noised(self, x0: Tensor, draw: Draw) -> tuple[Tensor, Tensor, Tensor]:
        """(x_t, training target, t) for x0, with this draw's noise and timesteps."""

    def current(self, x_t: Tensor, t: Tensor, condition: Any) -> Tensor:
        """The prediction of the model being trained, without gradient."""

    def frozen(self, x_t: Tensor, t: Tensor, condition: Any) -> Tensor:
        """The prediction of the frozen base model (without gradient; only for methods with `needs_frozen`)."""

    def concept_of_step(self, draw: Draw, count: int) -> Tensor:
        """`count` concept indices for rows that draw no image, seeded by the draw."""

    def sample(self, noise: Tensor, condition: Any, *, steps: int, window: tuple[int, int], guidance: float,
               base: bool = False) -> Tensor:
        """DDIM steps window[0]..window[1]-1 of `steps` (eta 0, step 0 the noisiest) from `noise` by the model being
        trained (or the frozen base model), with classifier-free guidance `guidance` under `condition` (no
        gradient)."""


class TrainedMethod(Protocol):
    """A method trained by the shared masked loop: the forget rows of each step."""

    images: tuple[str, ...]
    """The image sets its forget rows read (of IMAGE_SETS)."""
    needs_frozen: bool
    """Whether its targets come from the frozen base model (the run keeps a copy)."""
    retain_term: bool
    """Whether alpha times the ordinary diffusion loss on retain images joins each step (Stable Diffusion; the
    DDPM command adds its retain term to every method, as its reference)."""
    scope: Scope
    """The UNet parameters it trains."""

    def forget_chunk(self, session: Session, draw: Draw) -> Chunk:
        """The forget rows of this draw: their input, condition, target and weight."""


class EditMethod(Protocol):
    """A one-shot weight edit (no images, no training)."""

    scope: Scope
    """The UNet parameters it edits."""

    def edit(self, pipe: Any, concepts: list[tuple[str, str]], preserve: list[str]) -> dict[str, Any]:
        """Edit `pipe`'s UNet in place to erase (forget, target) `concepts` while keeping `preserve` prompts;
        returns what to record in the run's metrics."""


@dataclass(frozen=True)
class MethodSpec:
    """A method as the registry, the config and the run see it.

    `section` names the config section holding `settings` (variants of one method share it); `defaults` fills
    shared options the user left unset (e.g. ESD's 1000 steps of batch 1); `build(settings)` returns the
    implementation."""

    name: str
    summary: str
    source: str
    kind: str
    settings: type
    build: Callable[[Any], TrainedMethod | EditMethod]
    section: str | None = None
    needs_target: bool = False
    default_mask_ratio: float | None = None
    defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def trains(self) -> bool:
        return self.kind == TRAINED

    @property
    def section_name(self) -> str:
        return self.section or self.name


@dataclass(frozen=True)
class Scope:
    """A named set of UNet parameters, by parameter name."""

    name: str
    includes: Callable[[str], bool]


SD3_TEXT_KEY_VALUE = (".attn.add_k_proj.", ".attn.add_v_proj.")
"""In the joint attention of SD3's and FLUX's double-stream blocks (`transformer_blocks.*.attn`), the projections
of the text tokens into keys and values the image tokens attend to: the part of an MMDiT that plays
cross-attention's role. (SD3.5's `attn2` is image self-attention, not cross-attention; FLUX's single-stream
blocks project text and image tokens with the same weights, so they have no text-only part.)"""


def _cross_attention(name: str) -> bool:
    if name.startswith("transformer_blocks."):  # an SD3 transformer's parameter
        return any(part in name for part in SD3_TEXT_KEY_VALUE)
    return ".attn2." in name


def _cross_attention_key_value(name: str) -> bool:
    if name.startswith("transformer_blocks."):
        return any(part in name for part in SD3_TEXT_KEY_VALUE)
    return ".attn2.to_k." in name or ".attn2.to_v." in name


def _attention_projections(name: str) -> bool:
    return any(f".{part}." in name for part in ("to_q", "to_k", "to_v", "to_out", "add_q_proj", "add_k_proj",
                                                  "add_v_proj", "to_add_out"))


EVERYTHING = Scope("the whole denoiser (UNet or transformer)", lambda name: True)
CROSS_ATTENTION = Scope("cross-attention (attn2; SD3 and FLUX: the text key and value projections of the joint "
                        "attention)", _cross_attention)
CROSS_ATTENTION_KEY_VALUE = Scope("cross-attention key and value projections", _cross_attention_key_value)
ATTENTION = Scope("every attention projection (q, k, v, out; SD3: of both streams)", _attention_projections)


class ImageObjective:
    """Defaults of a trained method whose forget rows are the forget images, trained over the whole UNet, with
    no frozen copy and no retain term; subclasses override what differs."""

    images: tuple[str, ...] = ("forget",)
    needs_frozen = False
    retain_term = False
    scope = EVERYTHING

    def __init__(self, settings: Any) -> None:
        self.settings = settings
