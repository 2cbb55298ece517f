"""Config of `erasure bench erase` (data only: no torch import, so `--help` stays fast)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from erasure.config import option
from erasure.errors import ConfigError
from pipelines.attack_config import ATTACK_SETTINGS
from pipelines.methods import SD_METHODS
from pipelines.testbed_captions import CLASSES, QUALITY_PROMPT, caption

CONCEPT_SEPARATOR = "+"
NEXT_CLASS = "next-class"
RESERVED = ("model", "out", "method", "concept", "concepts", "forget_prompt", "remap_prompt", "seed", "overwrite",
            "resume", "preserve", "retain_prompts")
"""`erasure sd` options the benchmark sets for every run."""
ATTACK_RESERVED = ("attack", "model", "run", "prompts", "subset", "limit", "judge", "target_class", "seed", "guidance",
                   "steps", "height", "width", "out", "overwrite", "resume")
"""`erasure eval attack` options the benchmark sets for every attack."""


@dataclass
class BenchEraseConfig:
    """Erase testbed classes with every method and measure forgetting, retention and cost side by side."""

    model: str = option("testbed", "the base pipeline: 'testbed' (committed) or a testbed build's pipeline directory")
    judge: str = option("testbed", "the judge classifier: 'testbed' (committed), a classifier run or model file")
    concepts: list[str] = option(["airplane"], "what each row set erases: a class, or classes joined by '+' for "
                                               "several in one run (airplane+ship)")
    methods: list[str] = option(list(SD_METHODS), "the methods to compare", choices=tuple(SD_METHODS))
    target: str = option("a photo", "every concept's remap / anchor / target prompt")
    method_targets: dict[str, str] = option({}, "a method's own target instead of `target`, by method name: a "
                                                f"prompt, or '{NEXT_CLASS}' (the quality prompt of the next class "
                                                "not erased: SalUn's class-wise recipe, random_label.py)")
    images: str = option("generated", "forget/retain sets of the trained methods: 'generated' by the base model "
                                      "from the prompts, or 'real' CIFAR-10 training images of the erased / other "
                                      "classes with their quality prompts (SalUn's class-wise reference)",
                         choices=("generated", "real"))
    data_dir: str | None = option(None, "folder holding cifar10_jpeg.npz for `images: real` (default: "
                                        "$ERASURE_DATA_DIR, ../shared/data)")
    erase: dict[str, Any] = option({}, "more `erasure sd` options for every method run (e.g. {num_images: 200})")
    per_method: dict[str, Any] = option({}, "more `erasure sd` options for one method, by method name (e.g. "
                                            "{salun: {alpha: 0.5, epochs: 5}}: SalUn's object recipe)")
    lr_scale: float = option(1.0, "factor on every trained method's learning rate (its paper's default, or the one "
                                   "`erase`/`per_method` sets): the paper recipes are for Stable Diffusion, pretrained "
                                   "at 1e-4; the testbed pretrains at 1e-3, so its config sets 10", gt=0)
    retrained: dict[str, str] = option({}, "gold standard per concept set: a pipeline built without those classes "
                                           "(e.g. {airplane: outputs/testbed-no-airplane/pipeline})")
    attacks: list[str] = option([], "attacks whose success rate joins the report (each erased class's quality "
                                    "prompt and held-out templates, one image each; paraphrase: as written)",
                                choices=tuple(ATTACK_SETTINGS))
    attack: dict[str, Any] = option({}, "more `erasure eval attack` options for every attack, e.g. its budget "
                                        "({unlearndiffatk: {iterations: 10}}; default: the reference's)")
    seeds: list[int] = option([0], "seeds of each method run (and its evaluation images); 3 give mean +- std")
    per_prompt: int = option(50, "evaluation images per prompt", ge=2)
    steps: int = option(25, "sampling steps of the evaluation images (the testbed's DDIM)", ge=1)
    guidance: float = option(7.5, "guidance scale of the evaluation images (Stable Diffusion's default)", ge=1)
    batch_size: int = option(100, "images per pipeline call", ge=1)
    threads: int = option(1, "torch CPU threads (one was fastest on this busy 2-core machine)", ge=1)
    jobs: int = option(1, "method runs at once, each its own process with `threads` threads (2 on a 2-core "
                          "machine halves their wall time; each run's seconds then share the machine)", ge=1)
    out: str = option("outputs/bench-erase", "output directory: runs/, report.md, metrics.json, grid.png")
    overwrite: bool = option(False, "replace an existing output directory")
    resume: bool = option(False, "keep finished method runs and evaluations of an unfinished benchmark")

    def class_sets(self) -> list[list[str]]:
        """Each concept set as its list of classes."""
        return [entry.split(CONCEPT_SEPARATOR) for entry in self.concepts]

    def target_of(self, method: str, name: str, erased: list[str]) -> str:
        """The target prompt `method` erases class `name` towards, when it erases the classes `erased`."""
        target = self.method_targets.get(method, self.target)
        if target != NEXT_CLASS:
            return target
        start = CLASSES.index(name)
        following = (CLASSES[(start + step) % len(CLASSES)] for step in range(1, len(CLASSES)))
        return caption(QUALITY_PROMPT, next(c for c in following if c not in erased))

    def validate(self) -> None:
        """Check classes, the retrained keys and the `erase` options before any model is loaded."""
        for i, classes in enumerate(self.class_sets()):
            unknown = [name for name in classes if name not in CLASSES]
            if unknown or len(set(classes)) != len(classes):
                raise ConfigError(f"config key 'concepts[{i}]': '{self.concepts[i]}' must name distinct testbed "
                                  f"classes joined by '+' ({', '.join(CLASSES)})")
        extra = set(self.retrained) - set(self.concepts)
        if extra:
            raise ConfigError(f"config key 'retrained': '{sorted(extra)[0]}' is not one of the concepts "
                              f"{self.concepts}")
        if not self.seeds:
            raise ConfigError("config key 'seeds' must list at least one seed")
        for key in ("per_method", "method_targets"):
            unknown = set(getattr(self, key)) - set(SD_METHODS)
            if unknown:
                raise ConfigError(f"config key '{key}': '{sorted(unknown)[0]}' is not a method "
                                  f"({', '.join(SD_METHODS)})")
        for where, options, reserved, command in [
                ("erase", self.erase, RESERVED, "erasure sd"), ("attack", self.attack, ATTACK_RESERVED, "eval attack"),
                *((f"per_method.{m}", o, RESERVED, "erasure sd") for m, o in self.per_method.items())]:
            if not isinstance(options, dict):
                raise ConfigError(f"config key '{where}' must be a mapping of `{command}` options")
            for key in reserved:
                if key in options:
                    raise ConfigError(f"config key '{where}.{key}' is set by the benchmark itself; remove it")
