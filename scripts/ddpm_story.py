"""The whole DDPM unlearning story, stage by stage, with each stage's time. Prints one JSON line.

Stages (each an `erasure` command, run in this process; a stage whose output directory already
holds a finished run is reused, not rerun, and marked so):
1. judge    `erasure classifier train --config <judge>`           the CIFAR-10 classifier that judges
2. train    `erasure ddpm train --config <train>`                 the model to unlearn from
3. retrain  `erasure ddpm train ... --exclude <forget>`           the gold standard (--retrain)
4. unlearn  `erasure ddpm unlearn --config <unlearn> --method m`  for every --methods entry
5. eval     `erasure eval ddpm --config <eval> --run <run>`       every unlearned run and the retrain,
            against the trained model (protocol ddpm-cifar10-v1); the trained model's judged generations are
            kept in <train out>/eval-cache, so it is sampled once for every run and every later story

    python scripts/ddpm_story.py                 # the 16x16 CPU story (configs/ddpm_cpu*.yaml)
    accelerate launch --num_processes 1 --mixed_precision bf16 scripts/ddpm_story.py --story fast  # one H100
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from erasure.cli import main as erasure
from erasure.config import read_yaml
from erasure.io import MANIFEST, finished_manifest, read_json

STORIES = {
    "cpu": {"judge": "configs/classifier_cifar10_16_train.yaml", "train": "configs/ddpm_cpu.yaml",
            "unlearn": "configs/ddpm_cpu_unlearn.yaml", "eval": "configs/ddpm_cpu_eval.yaml"},
    "fast": {"judge": "configs/classifier_cifar10_train.yaml", "train": "configs/ddpm_fast.yaml",
             "unlearn": "configs/ddpm_unlearn.yaml", "eval": "configs/ddpm_eval.yaml"},
}
EVAL_KEYS = ("UA", "retained_accuracy", "distance", "sampling_seconds", "images_per_second")


def _stage(name: str, out: str, args: list[str], stages: dict[str, Any]) -> dict[str, Any]:
    """Run `erasure args` unless `out` already holds a finished run; record the wall time; return its metrics."""
    reused = finished_manifest(out) is not None
    start = time.perf_counter()
    if not reused and erasure([*args, "--out", out]) != 0:
        raise SystemExit(f"ddpm_story: stage '{name}' failed: erasure {' '.join(args)} --out {out}")
    stages[name] = {"out": out, "reused": reused, "seconds": None if reused else round(time.perf_counter() - start, 1)}
    return read_json(Path(out) / MANIFEST)["metrics"]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--story", choices=tuple(STORIES), default="cpu", help="which set of configs")
    parser.add_argument("--forget", default=None, help="the class to forget (default: the unlearn config's)")
    parser.add_argument("--methods", nargs="+", default=["salun"], choices=("salun", "ga", "rl", "esd", "ca"))
    parser.add_argument("--alpha", type=float, default=None, help="override the unlearn config's alpha")
    parser.add_argument("--steps", type=int, default=None, help="override the unlearn config's steps")
    parser.add_argument("--lr", type=float, default=None, help="override the unlearn config's learning rate")
    parser.add_argument("--mask-ratio", type=float, default=None, help="override salun's mask ratio")
    parser.add_argument("--retrain", action=argparse.BooleanOptionalAction, default=True,
                        help="also train and evaluate the model retrained without the class")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    configs = STORIES[args.story]
    judge_out = read_yaml(Path(configs["judge"]))["out"]
    train_out = read_yaml(Path(configs["train"]))["out"]
    forget = args.forget or read_yaml(Path(configs["unlearn"]))["forget"]
    overrides = {"alpha": args.alpha, "steps": args.steps, "lr": args.lr, "mask-ratio": args.mask_ratio}
    suffix = "".join(f"-{key}{value:g}" for key, value in overrides.items() if value is not None)

    def extra(method: str) -> list[str]:
        """The overrides as flags (the mask ratio is salun's: the other methods train unmasked)."""
        return [arg for key, value in overrides.items() if value is not None
                and (key != "mask-ratio" or method == "salun") for arg in (f"--{key}", str(value))]

    stages: dict[str, Any] = {}
    _stage("judge", judge_out, ["classifier", "train", "--config", configs["judge"]], stages)
    trained = _stage("train", train_out, ["ddpm", "train", "--config", configs["train"]], stages)
    runs = {}
    if args.retrain:
        runs["retrain"] = f"{train_out}-retrain-{forget}"
        _stage("retrain", runs["retrain"], ["ddpm", "train", "--config", configs["train"], "--exclude", forget], stages)
    unlearned = {}
    for method in args.methods:
        runs[method] = f"{train_out}-{method}-{forget}{suffix}"
        unlearned[method] = _stage(f"unlearn_{method}", runs[method],
                                   ["ddpm", "unlearn", "--config", configs["unlearn"], "--run", train_out,
                                    "--method", method, "--forget", forget, *extra(method)], stages)
    results = {}
    for name, run in runs.items():
        evaluation = _stage(f"eval_{name}", f"{run}/eval-ddpm",
                            ["eval", "ddpm", "--config", configs["eval"], "--run", run, "--judge", judge_out,
                             "--forget", forget, "--baseline", train_out, "--cache", f"{train_out}/eval-cache"],
                            stages)
        results[name] = {key: evaluation["evaluated"][key] for key in EVAL_KEYS}
        results[name]["change_vs_original"] = evaluation["change"]
        results["original"] = {key: evaluation["baseline"][key] for key in EVAL_KEYS}
        results["distance_metric"] = evaluation["distance_metric"]
    print(json.dumps({
        "story": args.story, "forget": forget, "device": _device(train_out),
        "train": {"preset": trained["preset"], "steps": trained["steps"], "train_seconds": trained["train_seconds"]},
        "unlearn": {m: {"run_seconds": u["run_seconds"], "forget_objective_before": u["forget_objective_before"],
                        "forget_objective_after": u["forget_objective_after"]} for m, u in unlearned.items()},
        "stages": stages, "results": results, "command": " ".join(sys.argv),
    }))


def _device(run: str) -> str | None:
    """The device a run's manifest records."""
    return read_json(Path(run) / MANIFEST).get("device")


if __name__ == "__main__":
    main()
