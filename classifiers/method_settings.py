"""Each classifier unlearning method's own settings, and the one registry of method names.

Light on purpose (no torch): the registry feeds `--method` choices, `--help`, YAML validation and
`compare`'s per_method. A method's settings live under its name in a config (`iu: {alpha: 3.0}`,
flag `--iu-alpha`; salun keeps its historical `--mask*` flags and l1_sparse `--l1-alpha`); the shared
optimisation settings stay on the command's config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from erasure.config import option

RL_PLANS = ("reference", "joint")
MASK_TYPES = ("hard", "soft")


@dataclass
class MethodSettings:
    """Settings of a method without knobs of its own; `default_lr` is its lr when the config gives none."""

    default_lr: ClassVar[float] = 0.05


@dataclass
class GradientAscentSettings(MethodSettings):
    """`ga`: no knobs; a small default lr, because ascent on the cross-entropy has no floor to stop at."""

    default_lr: ClassVar[float] = 5e-4


@dataclass
class RandomLabelSettings(MethodSettings):
    """`rl`: how an epoch composes its batches (its plan)."""

    default_lr: ClassVar[float] = 0.01
    plan: str = option(
        "reference", "'reference' (OPTML-Group/Unlearn-Saliency RL.py): each epoch a forget pass with labels drawn "
        "from all classes, then a retain pass, plain SGD at a constant lr; 'joint': every step sums a forget batch "
        "(labels other than the true one) and a retain batch, under the configured optimizer and schedule",
        choices=RL_PLANS)


@dataclass
class SalUnSettings(RandomLabelSettings):
    """`salun`: random labels under the saliency mask."""

    mask_ratio: float = option(0.5, "share of weights the saliency mask keeps", gt=0, lt=1,
                               flag="mask-ratio")
    mask: str | None = option(None, "a saved mask (.safetensors) to use instead of computing one",
                             flag="mask")
    mask_type: str = option("hard", "hard: keep or freeze each weight; soft: scale its gradient by a sigmoid of its "
                            "saliency around the same cut", choices=MASK_TYPES, flag="mask-type")
    mask_temperature: float = option(0.1, "temperature of the soft mask, in units of the mean |gradient|", gt=0,
                                     flag="mask-temperature")


@dataclass
class L1SparseSettings(MethodSettings):
    """`l1_sparse`: fine-tuning with a decaying L1 penalty."""

    alpha: float = option(5e-4, "L1 penalty weight, decayed linearly to 0", ge=0, flag="l1-alpha")


@dataclass
class InfluenceSettings(MethodSettings):
    """`iu`: one WoodFisher Newton step."""

    alpha: float = option(3.0, "step size of the influence update", gt=0)
    samples: int = option(64, "retain samples in the WoodFisher estimate of the Fisher", ge=1)
    damping: float = option(0.1, "damping added to the Fisher before inverting it", gt=0)


@dataclass
class PiggybackSettings(MethodSettings):
    """`piggyback_shrink`: learn a mask over the last stage, shrink its weights, fine-tune."""

    params: str | None = option(None, "regex of the weights to learn a mask over (default: the last stage: "
                                "resnet18's last two blocks, else the trunk's last two layers)",
                                flag="piggyback-params")
    penalty: float = option(1e-3, "L1 penalty on the mask scores, per weight", ge=0, flag="piggyback-lambda")
    threshold: float = option(5e-3, "mask scores above it select a weight", gt=0, flag="piggyback-threshold")
    init: float = option(1e-2, "initial mask score of every weight", gt=0, flag="piggyback-init")
    mask_lr: float = option(1e-3, "Adam learning rate of the mask scores", gt=0, flag="piggyback-lr")
    mask_epochs: int = option(3, "passes over the forget set to learn the mask", ge=1, flag="piggyback-epochs")
    eta: float = option(0.1, "factor the selected weights are multiplied by", gt=0, lt=1, flag="piggyback-eta")


@dataclass
class KaggleFirstSettings(MethodSettings):
    """`kaggle_1st`: KL to uniform on forget outputs, then forget-vs-retain contrast."""

    kl_epochs: float = option(1.0, "epochs (of the run's steps) pushing forget outputs to uniform", gt=0,
                              flag="kaggle1-kl-epochs")
    temperature: float = option(1.15, "temperature of the forget-vs-retain contrast", gt=0, flag="kaggle1-temperature")


@dataclass
class KaggleSecondSettings(MethodSettings):
    """`kaggle_2nd`: re-initialise the least forget-salient weights, then fine-tune under a soft mask."""

    reinit_ratio: float = option(0.3, "share of conv/linear weights with the smallest forget gradient to "
                                 "re-initialise", gt=0, lt=1, flag="kaggle2-reinit-ratio")
    grad_scale: float = option(0.1, "gradient factor of the weights not re-initialised", ge=0, le=1,
                               flag="kaggle2-grad-scale")


@dataclass
class SSDSettings(MethodSettings):
    """`ssd`: selective synaptic dampening (one-shot)."""

    alpha: float = option(10.0, "dampen weights whose forget importance exceeds alpha x the full-data importance",
                          gt=0)
    strength: float = option(1.0, "dampening lambda: selected weights scale by min(lambda x full / forget "
                             "importance, 1)", gt=0, flag="ssd-lambda")


METHOD_SETTINGS: dict[str, type[MethodSettings]] = {
    "ft": MethodSettings, "ga": GradientAscentSettings, "rl": RandomLabelSettings, "l1_sparse": L1SparseSettings,
    "salun": SalUnSettings, "iu": InfluenceSettings, "retrain": MethodSettings, "piggyback_shrink": PiggybackSettings,
    "kaggle_1st": KaggleFirstSettings, "kaggle_2nd": KaggleSecondSettings, "ssd": SSDSettings,
}
METHODS = tuple(METHOD_SETTINGS)
