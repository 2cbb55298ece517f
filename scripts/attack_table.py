"""ASR of several erased runs under several attacks: one `erasure eval attack` per (run, attack), one table.

Each pair gets its own directory `<out>/<run name>/<attack>`: reused when it holds a finished attack, resumed
when it holds an unfinished one. Writes `<out>/attack_table.md` (pre-attack ASR, ASR and cost per run and
attack) and prints one JSON line. Arguments after `--` go to every `erasure eval attack` (model, prompts,
judge, budget flags).

    python scripts/attack_table.py --runs outputs/sd-salun outputs/sd-esd --out outputs/attack-table \
        -- --model CompVis/stable-diffusion-v1-4 --limit 142
    python scripts/attack_table.py --runs outputs/testbed-salun outputs/testbed-esd --out outputs/testbed-attacks \
        -- --model outputs/testbed/pipeline --judge outputs/testbed/judge --target-class airplane \
           --prompts airplane_prompts.txt --height 16 --width 16
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from erasure.cli import main as erasure
from erasure.evaluation.report import markdown_table
from erasure.io import MANIFEST, atomic_open, finished_manifest, read_json

ATTACKS = ("paraphrase", "unlearndiffatk", "p4d", "ringabell")


def attack(run: str, name: str, out: Path, extra: list[str]) -> dict[str, Any]:
    """The metrics of `erasure eval attack --run run --attack name` in `out` (run, resumed or reused)."""
    if finished_manifest(out) is None:
        resume = ["--resume"] if (out / MANIFEST).is_file() else []
        if erasure(["eval", "attack", "--run", run, "--attack", name, "--out", str(out), *resume, *extra]) != 0:
            raise SystemExit(f"attack_table: erasure eval attack --run {run} --attack {name} failed")
    return read_json(out / MANIFEST)["metrics"]


def labels(runs: list[str]) -> list[str]:
    """A distinct folder name per run: the shortest tail of its path (parts joined by '-') that no other run's
    tail of that length equals, so runs named alike (`.../salun/seed0/run`, `.../uce/seed0/run`) keep their own
    attack folders and adding a run renames only the runs it collides with."""
    parts = [Path(run).resolve().parts for run in runs]
    if len(set(parts)) < len(parts):
        raise SystemExit("attack_table: a run is given twice")
    names = []
    for own in parts:
        length = next(n for n in range(1, len(own) + 1)
                      if all("-".join(other[-n:]) != "-".join(own[-n:]) for other in parts if other != own))
        names.append("-".join(own[-length:]))
    return names


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: one row per (run, attack)."""
    rows = [(r["run"], r["attack"], r["prompts"], r["pre_attack_asr"], r["asr"], r["seconds_per_prompt"],
             r["unet_calls_per_prompt"]) for r in results]
    return markdown_table(["run", "attack", "prompts", "pre-attack ASR", "ASR", "seconds per prompt",
                           "UNet calls per prompt"], rows)


def main(argv: list[str]) -> dict[str, Any]:
    ours, extra = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="erased run directories")
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=["paraphrase", "unlearndiffatk", "ringabell"])
    parser.add_argument("--out", required=True, help="folder of every attack's directory and the table")
    args = parser.parse_args(ours)
    out = Path(args.out)
    results = []
    for run, label in zip(args.runs, labels(args.runs), strict=True):
        for name in args.attacks:
            metrics = attack(run, name, out / label / name, extra)
            results.append({"run": run, "attack": name, "prompts": metrics["prompts"],
                            "pre_attack_asr": metrics["pre_attack_asr"], "asr": metrics["asr"],
                            "seconds_per_prompt": metrics["cost"]["seconds_per_prompt"],
                            "unet_calls_per_prompt": metrics["cost"]["model_calls_per_prompt"]["unet_calls"]})
    with atomic_open(out / "attack_table.md", "w") as handle:
        handle.write(f"# Attack success rates\n\nCommand: `{' '.join(['scripts/attack_table.py', *argv])}`\n\n"
                     f"{table(results)}\n")
    summary = {"table": str(out / "attack_table.md"), "results": results}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
