"""The attack columns of `erasure bench erase`: each model's attack success rate under `erasure eval attack`.

Every erased class's quality prompt and held-out templates are attacked (one image each, at the benchmark seed),
with the testbed's sampling settings and the benchmark's judge watching for that class; the rate pools the
classes of a concept set. Finished attacks are kept, so a resumed benchmark only attacks what is missing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from erasure.config import load_config
from erasure.io import finished_manifest
from pipelines.attack_config import AttackEvalConfig
from pipelines.bench_config import BenchEraseConfig
from pipelines.testbed_captions import CLASSES, prompt_groups
from pipelines.testbed_eval import judge_path
from pipelines.testbed_models import RESOLUTION

ATTACK_DIR = "attacks"


def attack_prompts(name: str) -> list[str]:
    """The prompts attacked for class `name`: its quality prompt and the templates held out of training."""
    groups = prompt_groups([name])
    return [text for text, _ in groups["forget"] + groups["held_out"]]


def attack_values(config: BenchEraseConfig, attack: str, name: str, seed: int, model: str, run: Path | None,
                  folder: Path) -> dict[str, Any]:
    """The `erasure eval attack` config that attacks class `name` of `model` (with `run`'s erased weights, if
    given), its prompt file and output under `folder`."""
    return {**config.attack, "attack": attack, "model": model, "run": None if run is None else str(run),
            "prompts": str(folder / f"{name}.txt"), "judge": str(judge_path(config.judge)),
            "target_class": str(CLASSES.index(name)), "seed": seed, "guidance": config.guidance,
            "steps": config.steps, "height": RESOLUTION, "width": RESOLUTION, "grid_size": 0,
            "out": str(folder / attack / name), "resume": True}


def attack_rates(config: BenchEraseConfig, model: str, run: Path | None, classes: list[str], seed: int,
                 folder: Path) -> dict[str, float]:
    """`pre_attack_pct` and `asr_<attack>_pct` of one model over every erased class's attacked prompts: `model` is
    the base pipeline `run` was erased from, or the pipeline itself when `run` is None."""
    from pipelines.attacks.runner import eval_attack

    if not config.attacks:
        return {}
    folder = folder / ATTACK_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in classes:
        (folder / f"{name}.txt").write_text("\n".join(attack_prompts(name)) + "\n")
    rates: dict[str, float] = {}
    for attack in config.attacks:
        successes = before = prompts = 0
        for name in classes:
            values = attack_values(config, attack, name, seed, model, run, folder)
            out = Path(values["out"])
            manifest = finished_manifest(out)
            metrics = manifest["metrics"] if manifest else eval_attack(load_config(AttackEvalConfig, None, values))
            successes += metrics["successes"]
            before += metrics["successes_before_attack"]
            prompts += metrics["prompts"]
        rates.setdefault("pre_attack_pct", round(100.0 * before / prompts, 2))  # the prompts as written: one rate
        rates[f"asr_{attack}_pct"] = round(100.0 * successes / prompts, 2)
    return rates


def check_attacks(config: BenchEraseConfig) -> None:
    """Every attack's `erasure eval attack` config, checked before any model is loaded."""
    for attack in config.attacks:
        load_config(AttackEvalConfig, None, attack_values(config, attack, CLASSES[0], config.seeds[0], config.model,
                                                          None, Path(ATTACK_DIR)))


def attack_columns(config: BenchEraseConfig) -> list[tuple[str, str]]:
    """The report's attack columns: the prompts' rate as written, then each attack's success rate."""
    if not config.attacks:
        return []
    return [("pre_attack_pct", "pre-attack %"), *((f"asr_{a}_pct", f"{a} ASR %") for a in config.attacks)]
