"""Configs of the classifier commands (data only: no torch import, so `--help` is fast)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from erasure.config import from_dict, option, read_yaml
from erasure.errors import ConfigError

DATASETS = ("digits", "cifar10")
ARCHS = ("mlp", "cnn", "resnet18")
CIFAR10_RESOLUTIONS = (32, 16, 8)
METHODS = ("ft", "ga", "rl", "l1_sparse", "salun", "iu", "retrain", "piggyback_shrink", "kaggle_1st", "kaggle_2nd",
           "ssd")
MASK_TYPES = ("hard", "soft")
RL_SCHEDULES = ("reference", "joint")
OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("onecycle", "cosine", "linear", "constant")
FORGET_SPEC = re.compile(r"^(class:.+|random:.+)$")


def _check_forget_syntax(spec: str) -> None:
    if not FORGET_SPEC.match(spec):
        raise ConfigError(
            f"config key 'forget' must look like 'class:<name|index>' or 'random:<fraction>', got '{spec}'"
        )


@dataclass
class OptimConfig:
    """Optimisation settings shared by training and unlearning."""

    epochs: int = option(10, "passes over the primary data stream", ge=1)
    batch_size: int = option(64, "examples per step (global, across processes)", ge=1)
    optimizer: str = option("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = option(0.05, "peak learning rate", gt=0)
    momentum: float = option(0.9, "SGD momentum (AdamW beta1 is fixed at 0.9)", ge=0, lt=1)
    nesterov: bool = option(True, "Nesterov momentum for SGD")
    weight_decay: float = option(5e-4, "weight decay", ge=0)
    schedule: str = option("onecycle", "learning-rate schedule over all steps", choices=SCHEDULES)
    warmup: float = option(0.2, "share of steps spent warming up (onecycle)", ge=0, lt=1)
    grad_clip: float = option(0.0, "clip the global gradient norm to this value after masking (0: off)", ge=0)
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy", ge=0, lt=1)
    channels_last: bool = option(False, "channels-last memory format (faster convolutions on GPUs)")
    compile: bool = option(False, "torch.compile the model (pays off for long GPU runs)")
    seed: int = option(0, "random seed (init, data order, augmentation, random labels)", ge=0)
    checkpoint_every: int = option(50, "save resumable state every N steps (0: never)", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "continue an unfinished run from its last checkpoint")


@dataclass
class TrainConfig(OptimConfig):
    """Train the original classifier on the whole training split."""

    out: str = option("outputs/classifier-train", "output directory")
    dataset: str = option("digits", "dataset: scikit-learn's bundled digits or CIFAR-10", choices=DATASETS)
    data_dir: str | None = option(None, "folder holding cifar10_jpeg.npz (default: $ERASURE_DATA_DIR, ../shared/data)")
    arch: str = option("mlp", "architecture", choices=ARCHS)
    width: int = option(64, "hidden width of mlp / base channels of cnn", ge=1)
    augment: bool = option(False, "random crop (pad an eighth of the size: 4 at 32) and horizontal flip on the device")
    resolution: int | None = option(None, "cifar10 only: average-pool images to 16 or 8 pixels (quick CPU runs, and "
                                          "the judge of a DDPM trained at that resolution); default: native 32",
                                   choices=CIFAR10_RESOLUTIONS)
    split_seed: int = option(0, "seed of the train/validation split", ge=0)
    train_limit: int | None = option(None, "use only the first N images of the training split (quick runs)", ge=1)

    def validate(self) -> None:
        """Cross-field checks."""
        if self.resolution is not None and self.dataset != "cifar10":
            raise ConfigError(f"config key 'resolution' applies to cifar10 only; remove it for dataset "
                              f"'{self.dataset}'")


@dataclass
class UnlearnConfig(OptimConfig):
    """Unlearn a forget set from the model of a finished `classifier train` run."""

    original: str = option("", "the --out directory of a finished `erasure classifier train` run")
    out: str = option("outputs/classifier-unlearn", "output directory")
    forget: str = option("class:0", "what to forget: 'class:<name|index>' or 'random:<fraction>'")
    method: str = option("salun", "unlearning method", choices=METHODS)
    schedule: str = option("constant", "learning-rate schedule over all steps (unlearning: constant, as the SalUn "
                                       "reference)", choices=SCHEDULES)
    nesterov: bool = option(False, "Nesterov momentum for SGD (unlearning: off, as the SalUn reference)")
    forget_batch_size: int = option(64, "forget examples per step for methods that use both sets in one step", ge=1)
    rl_schedule: str = option("reference", "rl, salun: 'reference' (each epoch one pass over the forget set with "
                                           "labels drawn from all classes, then one pass over the retain set, as "
                                           "the SalUn code) or 'joint' (every step adds a forget batch with wrong "
                                           "labels and a retain batch)", choices=RL_SCHEDULES)
    mask_ratio: float = option(0.5, "share of weights the saliency mask keeps (salun)", gt=0, lt=1)
    mask: str | None = option(None, "a saved mask (.safetensors) to use instead of computing one (salun)")
    mask_type: str = option("hard", "hard: keep or freeze each weight; soft: scale its gradient by a sigmoid of its "
                            "saliency around the same cut (salun)", choices=MASK_TYPES)
    mask_temperature: float = option(0.1, "temperature of the soft mask, in units of the mean |gradient| (salun)",
                                     gt=0)
    l1_alpha: float = option(5e-4, "L1 penalty weight, decayed linearly to 0 by epoch (l1_sparse)", ge=0)
    stop_forget_acc: float | None = option(None, "stop early once forget-set accuracy (%) falls to this value", ge=0,
                                           le=100)
    stop_check_every: int = option(5, "steps between the checks of stop_forget_acc", ge=1)
    iu_alpha: float = option(3.0, "step size of the influence update (iu)", gt=0)
    iu_samples: int = option(64, "retain samples in the WoodFisher estimate of the Fisher (iu)", ge=1)
    iu_damping: float = option(0.1, "damping added to the Fisher before inverting it (iu)", gt=0)
    piggyback_params: str | None = option(None, "regex of the weights to learn a mask over (default: the last "
                                          "stage: resnet18's last two blocks, else the trunk's last two layers)")
    piggyback_lambda: float = option(1e-3, "L1 penalty on the mask scores, per weight (piggyback_shrink)", ge=0)
    piggyback_threshold: float = option(5e-3, "mask scores above it select a weight (piggyback_shrink)", gt=0)
    piggyback_init: float = option(1e-2, "initial mask score of every weight (piggyback_shrink)", gt=0)
    piggyback_lr: float = option(1e-3, "Adam learning rate of the mask scores (piggyback_shrink)", gt=0)
    piggyback_epochs: int = option(3, "passes over the forget set to learn the mask (piggyback_shrink)", ge=1)
    piggyback_eta: float = option(0.1, "factor the selected weights are multiplied by (piggyback_shrink)", gt=0, lt=1)
    kaggle1_kl_epochs: float = option(1.0, "epochs (of the run's steps) pushing forget outputs to uniform (kaggle_1st)",
                                      gt=0)
    kaggle1_temperature: float = option(1.15, "temperature of the forget-vs-retain contrast (kaggle_1st)", gt=0)
    kaggle2_reinit_ratio: float = option(0.3, "share of conv/linear weights with the smallest forget gradient to "
                                         "re-initialise (kaggle_2nd)", gt=0, lt=1)
    kaggle2_grad_scale: float = option(0.1, "gradient factor of the weights not re-initialised (kaggle_2nd)", ge=0,
                                       le=1)
    ssd_alpha: float = option(10.0, "dampen weights whose forget importance exceeds alpha x the full-data importance "
                              "(ssd)", gt=0)
    ssd_lambda: float = option(1.0, "dampening: selected weights scale by min(lambda x full / forget importance, 1) "
                               "(ssd)", gt=0)
    retrain: str | None = option(None, "a finished retrain run to report the gap to (Avg.Gap)")

    def validate(self) -> None:
        """Cross-field checks."""
        if not self.original:
            raise ConfigError("config key 'original' is required: pass --original <dir of a finished classifier train run>")
        _check_forget_syntax(self.forget)


@dataclass
class CompareConfig:
    """Train an original and a retrained model, run each method, and write a comparison report."""

    out: str = option("outputs/classifier-compare", "output directory")
    forget: str = option("class:0", "what to forget: 'class:<name|index>' or 'random:<fraction>'")
    methods: list[str] = option(["ft", "ga", "rl", "l1_sparse", "salun"], "methods to compare", choices=METHODS)
    train_file: str | None = option(None, "a `classifier train` YAML with the original model's settings")
    train: dict = option({}, "settings of the original model (keys of `classifier train`; override train_file)")
    unlearn: dict = option({}, "settings shared by every method (keys of `classifier unlearn`)")
    per_method: dict = option({}, "per-method settings overriding `unlearn`, e.g. {ga: {lr: 0.01}}")
    original: str | None = option(None, "reuse the model of a finished train run instead of training one")
    retrain: str | None = option(None, "reuse a finished retrain run (same forget set and seed) instead of training one")
    seed: int = option(0, "seed of every run (overrides train/unlearn seeds)", ge=0)
    seeds: list[int] = option([], "several seeds: run everything once per seed (in out/seed<k>) and report "
                              "mean ± std (overrides seed)")
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "reuse the finished parts of an unfinished comparison")

    def validate(self) -> None:
        """Validate the nested sections against the configs they feed."""
        _check_forget_syntax(self.forget)
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"config key 'seeds' must hold distinct non-negative integers, got {self.seeds}")
        if len(self.seeds) > 1 and self.retrain is not None:
            raise ConfigError("config key 'retrain' names one retrain run, but 'seeds' asks for one per seed; "
                              "leave 'retrain' unset so each seed trains its own")
        self.train_config()
        for method in self.methods:
            self.unlearn_config(method, original="<original>", out="<out>")
        unknown = sorted(set(self.per_method) - set(METHODS))
        if unknown:
            raise ConfigError(f"config key 'per_method' names unknown methods {unknown}; choices: {', '.join(METHODS)}")

    def train_config(self, **fixed: object) -> TrainConfig:
        """The TrainConfig of the original model: train_file, then `train`, then the fixed values."""
        base = read_yaml(self.train_file) if self.train_file else {}
        return from_dict(TrainConfig, {**base, **self.train, "seed": self.seed, **fixed}, source="'train'")

    def unlearn_config(self, method: str, **fixed: object) -> UnlearnConfig:
        """The UnlearnConfig of one method: shared settings, then its own."""
        data = {**self.unlearn, **self.per_method.get(method, {}), "method": method, "forget": self.forget,
                "seed": self.seed, **fixed}
        return from_dict(UnlearnConfig, data, source=f"'per_method.{method}'")


@dataclass
class MaskConfig:
    """Compute a saliency mask of a trained classifier over a forget set."""

    original: str = option("", "the --out directory of a finished `erasure classifier train` run")
    forget: str = option("class:0", "what to forget: 'class:<name|index>' or 'random:<fraction>'")
    ratio: float | None = option(None, "share of weights to keep (top |gradient|; 0.5 when no threshold is given)",
                                 gt=0, lt=1)
    threshold: float | None = option(None, "keep weights with |gradient| >= threshold instead of a ratio", ge=0)
    params: str | None = option(None, "regex of parameter names to consider (default: all)")
    batch_size: int = option(256, "forget examples per gradient batch", ge=1)
    packed: bool = option(False, "store the mask bit-packed (8x smaller) instead of as bool tensors")
    out: str = option("outputs/mask.safetensors", "mask file to write")
    overwrite: bool = option(False, "replace an existing mask file")
    seed: int = option(0, "seed of the forget-set draw for random:<fraction>", ge=0)

    def validate(self) -> None:
        """Exactly one selection rule and a source run."""
        if not self.original:
            raise ConfigError("config key 'original' is required: pass --original <dir of a finished classifier train run>")
        _check_forget_syntax(self.forget)
        if self.ratio is not None and self.threshold is not None:
            raise ConfigError("give only one of 'ratio' and 'threshold': a mask keeps a share of weights or those above a threshold")
        if self.threshold is None and self.ratio is None:
            self.ratio = 0.5
