"""Configs of `erasure ddpm {train,unlearn}` and `erasure eval ddpm` (data only: no torch/diffusers import)."""
from __future__ import annotations

from dataclasses import dataclass

from classifiers.config import CIFAR10_RESOLUTIONS
from erasure.config import TrackerConfig, option, reject_other_sections, with_method_sections
from erasure.config import class_index as shared_class_index
from erasure.errors import ConfigError
from erasure.evaluation.config import SCHEDULERS, check_device
from pipelines.methods import DDPM_METHODS, method_help, method_sections
from pipelines.methods.salun import DEFAULT_GUIDANCE

DDPM_PRESETS = ("tiny", "cpu", "fast", "paper")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def class_index(value: str | int, key: str = "class") -> int:
    """A CIFAR-10 class given by name or index, as its index; anything else is a ConfigError listing the names."""
    return shared_class_index(value, CIFAR10_CLASSES, f"config key '{key}'")


@dataclass
class DDPMTrainConfig(TrackerConfig):
    """Train a class-conditional DDPM (classifier-free guidance) on CIFAR-10."""

    preset: str = option("fast", "UNet size: tiny (tests), cpu (2.5M, for 16x16 CPU runs), fast (<= 15 min on one "
                                 "H100), paper (ch 128, ~36M)", choices=DDPM_PRESETS)
    resolution: int = option(32, "image size: CIFAR-10's 32, or 16 / 8 (average-pooled; quick CPU runs, judged by a "
                                 "classifier trained at the same resolution)", choices=CIFAR10_RESOLUTIONS)
    out: str = option("outputs/ddpm-cifar10", "output directory")
    data_dir: str | None = option(None, "folder holding cifar10_jpeg.npz (default: $ERASURE_DATA_DIR, ../shared/data)")
    steps: int = option(20000, "optimizer steps", ge=1)
    batch_size: int = option(128, "images per step (global, across processes)", ge=1)
    lr: float = option(2e-4, "Adam learning rate after warm-up", gt=0)
    warmup: int = option(1000, "steps of linear learning-rate warm-up", ge=0)
    grad_clip: float = option(1.0, "clip the global gradient norm to this value (0: off)", ge=0)
    ema_decay: float = option(0.9999, "decay of the EMA weights that are saved for sampling", ge=0, lt=1)
    label_dropout: float = option(0.1, "share of labels replaced by the null class (classifier-free guidance)",
                                  ge=0, lt=1)
    flip: bool = option(True, "random horizontal flips")
    exclude: str | None = option(None, "leave this class (name or index) out of training: the retrain gold standard")
    train_limit: int | None = option(None, "use only the first N training images (quick runs)", ge=1)
    seed: int = option(0, "random seed (init, data order, noise, timesteps, label dropout)", ge=0)
    checkpoint_every: int = option(1000, "save resumable state every N steps (0: never)", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished run from its last checkpoint")

    def validate(self) -> None:
        """Cross-field checks."""
        if self.exclude is not None:
            class_index(self.exclude, "exclude")


@dataclass
class DDPMUnlearnSharedConfig(TrackerConfig):
    """The settings every DDPM unlearning method shares; `DDPMUnlearnConfig` adds one section per method."""

    run: str = option("", "the --out directory of a finished `erasure ddpm train` run")
    forget: str = option("airplane", "the class to forget (name or index)")
    method: str = option("salun", method_help(DDPM_METHODS) + "; its own settings: the section of its name",
                         choices=tuple(DDPM_METHODS))
    remap: str | None = option(None, "the class the forgotten one becomes: salun's remap class, ca's anchor class "
                                     "(default: (forget + 1) mod 10)")
    mask_ratio: float | None = option(None, "share of UNet weights the saliency mask keeps, for any method (default: "
                                            "0.5 for salun, no mask for the others)", gt=0, lt=1)
    mask_batches: int | None = option(None, "forget batches whose clipped gradients make the mask (default: the "
                                            "whole forget class, as the reference)", ge=1)
    mask_guidance: float = option(DEFAULT_GUIDANCE, "guidance w of the mask loss (1 + w) eps(c) - w eps(null), as "
                                                    "the reference (2); 0 is the unguided conditional loss", ge=0)
    alpha: float = option(1e-3, "weight of the retain term, the diffusion loss SUMMED over each image's channels and "
                                "pixels (the reference's units: 1e-3 is its setting)", ge=0)
    label_dropout: float = option(0.1, "share of labels dropped to the null class in every training forward (the "
                                       "reference model's train-mode cond_drop_prob)", ge=0, lt=1)
    antithetic: bool = option(True, "antithetic timesteps (t and T - 1 - t), as the reference draws them")
    lr: float = option(1e-4, "Adam learning rate", gt=0)
    steps: int = option(1000, "optimizer steps", ge=1)
    forget_batch_size: int = option(128, "forget-class images per step", ge=1)
    retain_batch_size: int = option(128, "retained-class images per step", ge=1)
    grad_clip: float = option(1.0, "clip the global gradient norm to this value after masking (0: off)", ge=0)
    out: str = option("outputs/ddpm-unlearn", "output directory")
    seed: int = option(0, "random seed (data order, noise, timesteps, random labels)", ge=0)
    checkpoint_every: int = option(200, "save resumable state every N steps (0: never)", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished run from its last checkpoint")

    @property
    def forget_class(self) -> int:
        """The forgotten class index."""
        return class_index(self.forget, "forget")

    @property
    def remap_class(self) -> int:
        """The class the forgotten class is remapped to (salun) or ablated towards (ca)."""
        if self.remap is None:
            return (self.forget_class + 1) % len(CIFAR10_CLASSES)
        return class_index(self.remap, "remap")

    def validate(self) -> None:
        """Cross-field checks: a run is given, the classes exist, and the remap class differs from the forgotten one."""
        if not self.run:
            raise ConfigError("config key 'run' is required: pass --run <dir of a finished `erasure ddpm train` run>")
        if self.remap_class == self.forget_class:
            raise ConfigError(f"config key 'remap': the remap class '{CIFAR10_CLASSES[self.remap_class]}' is the "
                              "forgotten class itself; pass another class to --remap (or omit it for (forget + 1) "
                              "mod 10)")
        reject_other_sections(self, method_sections(DDPM_METHODS), self.method,
                              DDPM_METHODS[self.method].section_name)
        if self.mask_ratio is None:
            self.mask_ratio = DDPM_METHODS[self.method].default_mask_ratio


DDPMUnlearnConfig = with_method_sections(
    "DDPMUnlearnConfig", DDPMUnlearnSharedConfig, method_sections(DDPM_METHODS), module=__name__,
    doc="Unlearn a class from a trained class-conditional DDPM (SalUn: remap + saliency mask; or ga, rl, esd, ca): "
        "the shared settings plus one section per method (e.g. `esd: {guidance: 1}`, flag --esd-guidance).")


@dataclass
class DDPMEvalConfig:
    """Protocol ddpm-cifar10-v1: forgetting (UA) and retained-class quality of a DDPM, judged by a CIFAR-10
    classifier."""

    run: str = option("", "a finished `erasure ddpm train` or `erasure ddpm unlearn` run")
    judge: str = option("outputs/cifar10-cnn", "a finished `erasure classifier train` run on CIFAR-10 (the judge)")
    forget: str | None = option(None, "the forgotten class (default: the unlearn run's, or a retrain run's exclude)")
    baseline: str = option("auto", "a run to compare with; 'auto': the model an unlearn run started from (none for "
                                   "a trained run); 'none': no comparison")
    n_forget: int = option(500, "images generated of the forgotten class", ge=1)
    n_per_class: int = option(100, "images generated of each retained class", ge=2)
    guidance: float = option(DEFAULT_GUIDANCE, "guidance w: (1 + w) eps(x, c) - w eps(x, null)", ge=0)
    steps: int = option(100, "denoising steps", ge=1)
    scheduler: str = option("ddim", "sampler; 'model' is the run's DDPM scheduler", choices=SCHEDULERS)
    features: str = option("auto", "distance features: 'inception' (FID), 'classifier' (the judge's penultimate "
                                   "layer), or 'auto' (Inception when it loads, else the judge)",
                           choices=("auto", "inception", "classifier"))
    batch_size: int = option(250, "images per sampling forward pass", ge=1)
    seed: int = option(0, "seed of image i of class c is seed + 100003 * c + i", ge=0)
    device: str = option("auto", "auto (cuda if available), cpu, cuda, cuda:N or mps")
    cache: str | None = option(None, "a folder keeping each model's judged generations, keyed by its weights, the "
                                     "judge and every setting above: a baseline that several evaluations share "
                                     "(a sweep's original) is then sampled once")
    out: str | None = option(None, "output directory (default: <run>/eval-ddpm)")
    overwrite: bool = option(False, "replace an existing output directory")

    def validate(self) -> None:
        """Cross-field checks."""
        if not self.run:
            raise ConfigError("config key 'run' is required: pass --run <dir of a finished ddpm run>")
        if self.forget is not None:
            class_index(self.forget, "forget")
        check_device("device", self.device)
