"""Configs of the classifier commands (data only: no torch import, so `--help` is fast)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from classifiers.method_settings import METHOD_SETTINGS, METHODS, MethodSettings
from erasure.config import TrackerConfig, from_dict, grid, option, read_yaml, with_method_sections
from erasure.errors import ConfigError

DATASETS = ("digits", "cifar10")
ARCHS = ("mlp", "cnn", "resnet18")
CIFAR10_RESOLUTIONS = (32, 16, 8)
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
class TrainConfig(TrackerConfig, OptimConfig):
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
class UnlearnSharedConfig(TrackerConfig, OptimConfig):
    """The settings every unlearning method shares; `UnlearnConfig` adds one section per method."""

    original: str = option("", "the --out directory of a finished `erasure classifier train` run")
    out: str = option("outputs/classifier-unlearn", "output directory")
    forget: str = option("class:0", "what to forget: 'class:<name|index>' or 'random:<fraction>'")
    method: str = option("salun", "unlearning method (its own settings: the section of its name)", choices=METHODS)
    lr: float | None = option(None, "peak learning rate (default: the method's own: " + ", ".join(
        f"{name} {settings.default_lr}" for name, settings in METHOD_SETTINGS.items()) + ")", gt=0)
    schedule: str = option("constant", "learning-rate schedule over all steps (unlearning: constant, the SalUn "
                                       "reference's optimizer for every method)", choices=SCHEDULES)
    nesterov: bool = option(False, "Nesterov momentum for SGD (unlearning: off, as the SalUn reference)")
    forget_batch_size: int = option(64, "forget examples per step for methods that read both sets in one step "
                                    "(rl/salun joint, kaggle_1st)", ge=1)
    stop_forget_acc: float | None = option(None, "stop early once forget-set accuracy (%) falls to this value", ge=0,
                                           le=100)
    stop_check_every: int = option(5, "steps between the checks of stop_forget_acc", ge=1)
    retrain: str | None = option(None, "a finished retrain run to report the gap to (Avg.Gap)")

    @property
    def settings(self) -> MethodSettings:
        """The settings of the chosen method."""
        return getattr(self, self.method, None) or METHOD_SETTINGS[self.method]()

    def validate(self) -> None:
        """Cross-field checks, and the method's own lr when none is given."""
        if not self.original:
            raise ConfigError("config key 'original' is required: "
                              "pass --original <dir of a finished classifier train run>")
        _check_forget_syntax(self.forget)
        if self.lr is None:
            self.lr = METHOD_SETTINGS[self.method].default_lr


UnlearnConfig = with_method_sections(
    "UnlearnConfig", UnlearnSharedConfig, METHOD_SETTINGS, module=__name__,
    doc="Unlearn a forget set from the model of a finished `classifier train` run: the shared settings plus one "
        "section per method (e.g. `iu: {alpha: 3.0}`, flag --iu-alpha).")


@dataclass
class CompareConfig:
    """Train an original and a retrained model, run each method, and write a comparison report."""

    out: str = option("outputs/classifier-compare", "output directory")
    forget: str = option("class:0", "what to forget: 'class:<name|index>' or 'random:<fraction>'")
    methods: list[str] = option(["ft", "ga", "rl", "l1_sparse", "salun"], "methods to compare", choices=METHODS)
    train_file: str | None = option(None, "a `classifier train` YAML with the original model's settings")
    train: dict = option({}, "settings of the original model (keys of `classifier train`; override train_file)")
    unlearn: dict = option({}, "settings shared by every method (keys of `classifier unlearn`)")
    per_method: dict = option({}, "per-method settings overriding `unlearn`: shared keys and the method's own, "
                              "e.g. {ga: {lr: 0.01}, iu: {alpha: 3.0}}")
    original: str | None = option(None, "reuse the model of a finished train run instead of training one")
    retrain: str | None = option(None, "reuse a finished retrain run (same forget set and seed) instead of "
                                       "training one")
    seed: int = option(0, "seed of every run (overrides train/unlearn seeds)", ge=0)
    seeds: list[int] = option([], "several seeds: run everything once per seed (in out/seed<k>) and report "
                              "mean ± std (overrides seed)")
    search_file: str | None = option(None, "a YAML of per-method grids (the `search` mapping), shared by scenarios "
                                           "(`extends: <file>` starts from another file's grids); grids of methods "
                                           "not compared are skipped")
    search: dict = option({}, "per-method grids chosen on validation data, never the test set, e.g. "
                              "{salun: {lr: [0.005, 0.01], mask_ratio: [0.3, 0.5]}}: every point runs and the one "
                              "closest to retrain on validation data is the method's row (overrides search_file)")
    lira_shadows: int = option(0, "shadow models (the retrain recipe with their own seeds) for the likelihood-ratio "
                                  "membership attack LiRA beside MIA-efficacy (0: off; at least 2)", ge=0)
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "reuse the finished parts of an unfinished comparison")

    def validate(self) -> None:
        """Validate the nested sections against the configs they feed."""
        _check_forget_syntax(self.forget)
        if self.lira_shadows == 1:
            raise ConfigError("config key 'lira_shadows' must be 0 (off) or at least 2: LiRA fits a Gaussian to "
                              "the shadows' confidences")
        if any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"config key 'seeds' must hold distinct non-negative integers, got {self.seeds}")
        if len(self.seeds) > 1 and self.retrain is not None:
            raise ConfigError("config key 'retrain' names one retrain run, but 'seeds' asks for one per seed; "
                              "leave 'retrain' unset so each seed trains its own")
        self.train_config()
        unknown = sorted(set(self.per_method) - set(METHODS))
        if unknown:
            raise ConfigError(f"config key 'per_method' names unknown methods {unknown}; choices: {', '.join(METHODS)}")
        for method in dict.fromkeys([*self.methods, *self.per_method]):
            self.unlearn_config(method, original="<original>", out="<out>")
        self._validate_search()

    def _validate_search(self) -> None:
        """Each searched method is compared, and each grid is a non-empty list per key that makes a valid run."""
        if self.search_file:
            grids = read_search_file(self.search_file)
            self.search = {**{m: g for m, g in grids.items() if m in self.methods}, **self.search}
            self.search_file = None
        for method, space in self.search.items():
            if method not in self.methods or method == "retrain":
                raise ConfigError(f"config key 'search.{method}': searches only methods listed in 'methods' "
                                  f"(not retrain), got '{method}'")
            if not isinstance(space, dict) or not space or not all(
                    isinstance(v, list) and v for v in space.values()):
                raise ConfigError(f"config key 'search.{method}' must map each setting to a non-empty list of "
                                  f"values, e.g. {{lr: [0.01, 0.02]}}, got {space!r}")
            for point in grid(space):
                self.unlearn_config(method, point, original="<original>", out="<out>")

    def log_with(self) -> str | None:
        """The tracker every run of the comparison logs to: `unlearn`'s log_with, else the original's."""
        return self.unlearn.get("log_with", self.train_config().log_with)

    def train_config(self, **fixed: object) -> TrainConfig:
        """The TrainConfig of the original model: train_file, then `train`, then the fixed values."""
        base = read_yaml(self.train_file) if self.train_file else {}
        return from_dict(TrainConfig, {**base, **self.train, "seed": self.seed, **fixed}, source="'train'")

    def unlearn_config(self, method: str, point: dict | None = None, **fixed: object) -> Any:
        """The UnlearnConfig of one method: shared settings, then its own (per_method keys of the method's
        settings go to its section, the others override the shared ones), then a search point's."""
        own = {f.name for f in dataclasses.fields(METHOD_SETTINGS[method])}
        overrides = self.per_method.get(method, {})
        if not isinstance(overrides, dict):
            raise ConfigError(f"config key 'per_method.{method}' must be a mapping of settings, got {overrides!r}")
        overrides = {**overrides, **(point or {})}
        data = {**self.unlearn, **{k: v for k, v in overrides.items() if k not in own},
                **{f"{method}.{k}": v for k, v in overrides.items() if k in own},
                "method": method, "forget": self.forget, "seed": self.seed, **fixed}
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
            raise ConfigError("config key 'original' is required: "
                              "pass --original <dir of a finished classifier train run>")
        _check_forget_syntax(self.forget)
        if self.ratio is not None and self.threshold is not None:
            raise ConfigError("give only one of 'ratio' and 'threshold': a mask keeps a share of weights or "
                              "those above a threshold")
        if self.threshold is None and self.ratio is None:
            self.ratio = 0.5


def read_search_file(path: str) -> dict[str, Any]:
    """A search file's per-method grids. `extends: <file>` starts from that file's grids, and each method the file
    itself names replaces the one it inherits (so a scenario's wider grid for a few methods is not a copy)."""
    grids = read_yaml(path)
    base = grids.pop("extends", None)
    if base is None:
        return grids
    if not isinstance(base, str):
        raise ConfigError(f"'{path}': config key 'extends' must name another search file, got {base!r}")
    return {**read_search_file(base), **grids}
