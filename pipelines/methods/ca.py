"""Concept Ablation (Kumari et al., ICCV 2023): make the model's prediction for the concept prompt on anchor
images match its own prediction for the anchor prompt, so the concept renders as the anchor.

Reference: nupurkmr9/concept-ablation, `diffusers/train.py` and its README recipes. Anchor images are generated
from the anchor prompt (our target prompt: "a painting" for a style, "a cat" for "grumpy cat"); on their noised
latents x_t the loss is MSE(eps(x_t, t, c_concept), sg eps(x_t, t, c_anchor)) with the anchor prediction made
by the *same* model under no_grad ('model-based', the default `loss_type_reverse`), or MSE against the noise
('noise'). `prior_preservation` adds the ordinary diffusion loss on anchor-prompt images with weight alpha (the
reference's `prior_loss_weight` 1; its recipe for nudity and for objects whose prompts overlap the anchor's).
Parameters as its `parameter_group`: cross-attention keys and values (default), every attention projection
('attn', its nudity recipe) or the whole UNet. Defaults follow the README's style/object recipe: 100 steps of
8 images (2 GPUs x 4), AdamW lr 2e-6 scaled by the batch (`--scale_lr`: 1.6e-5), weight decay 1e-2, gradients
clipped to norm 1 (its `max_grad_norm`). Its loss is a masked sum over the 4 latent channels divided by the
1-channel mask's sum, 4x a mean: no effect under Adam.

On the class-conditional DDPM (`erasure ddpm unlearn --method ca`): the anchor is the `remap` class, its anchor
images are its training images, the whole UNet trains (class labels enter through the class embedding, not
cross-attention) and the DDPM's retain term takes the place of prior preservation.

Departures: one anchor prompt per concept, not 200 generated captions mixing anchor and concept words; no
horizontal-flip augmentation and no 1-pixel border mask; under prior preservation the reference doubles the
learning rate, here the user sets `--lr` (the default stays 1.6e-5).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from erasure.config import option
from pipelines.methods.base import (
    ATTENTION,
    CROSS_ATTENTION_KEY_VALUE,
    EVERYTHING,
    TRAINED,
    Chunk,
    Draw,
    MethodSpec,
    Session,
)

LOSSES = ("model-based", "noise")
PARAMETER_GROUPS = {"cross-attn": CROSS_ATTENTION_KEY_VALUE, "attn": ATTENTION, "full-weight": EVERYTHING}


@dataclass
class CASettings:
    """Concept Ablation's settings."""

    loss: str = option("model-based", "target of the concept prompt on anchor images: the model's own anchor "
                                      "prediction ('model-based', the reference default) or the noise", choices=LOSSES)
    parameters: str = option("cross-attn", "what trains: cross-attention keys/values ('cross-attn'), every attention "
                                           "projection ('attn') or the whole UNet ('full-weight')",
                             choices=tuple(PARAMETER_GROUPS))
    prior_preservation: bool = option(False, "add alpha times the diffusion loss on anchor-prompt images (retain "
                                             "prompts default to the anchors)")


class ConceptAblation:
    """The concept prompt, on anchor images, predicts what the anchor prompt predicts."""

    def __init__(self, settings: CASettings) -> None:
        self.settings = settings
        self.images = ("anchor",)
        self.needs_frozen = False
        self.retain_term = settings.prior_preservation
        self.scope = PARAMETER_GROUPS[settings.parameters]

    def forget_chunk(self, session: Session, draw: Draw) -> Chunk:
        x0, concept = session.images("anchor", draw)
        x_t, noise_target, t = session.noised(x0, draw)
        target = (session.current(x_t, t, session.condition("target", concept))
                  if self.settings.loss == "model-based" else noise_target)
        return Chunk(x_t, t, session.condition("forget", concept), target, 1.0)


SPEC = MethodSpec(
    name="ca", summary="Concept Ablation: on anchor images the concept prompt predicts what the anchor prompt does",
    source="Kumari et al. 2023, nupurkmr9/concept-ablation diffusers/train.py", kind=TRAINED, settings=CASettings,
    build=ConceptAblation, needs_target=True,
    defaults={"steps": 100, "batch_size": 8, "lr": 1.6e-5, "weight_decay": 1e-2, "alpha": 1.0, "grad_clip": 1.0})


@dataclass
class DDPMCASettings:
    """DDPM `ca`: ablate the forgotten class towards the `remap` class on that class's training images."""

    loss: str = option("model-based", "target of the forgotten class on anchor images: the model's own anchor-class "
                                      "prediction ('model-based', the reference default) or the noise", choices=LOSSES)


def _ddpm_ablation(settings: DDPMCASettings) -> ConceptAblation:
    return ConceptAblation(CASettings(loss=settings.loss, parameters="full-weight"))


DDPM_SPEC = dataclasses.replace(SPEC, settings=DDPMCASettings, build=_ddpm_ablation, defaults={},
                                summary="Concept Ablation: on the remap class's images the forgotten class predicts "
                                        "what the remap class does")
