"""`erasure bench erase`: erase testbed classes with every method, judge what is forgotten and what is kept.

For each concept set and seed, every method runs as its own `erasure sd` process (so its wall time and peak
memory are its own; `jobs` of them at once, each judged as soon as it is done) on the base pipeline, with every
erased class's quality prompt as a concept (target: the `target` prompt, or the method's own in
`method_targets`) and the other classes' quality prompts to preserve. Each result is judged by the testbed's
classifier on the same prompts and seeds as the base model (and the retrained gold standard when given):

- forgetting: the share of images judged as an erased class, from its quality prompt, from the templates held
  out of training, and from its synonyms (lower is better; UA = 100 - it);
- retention: the judge's accuracy on the other classes' quality prompts, and the Fréchet distance of the judge's
  penultimate features of those images to the base model's (a feature distance, not FID);
- cost: seconds and peak resident memory of the erasure process.

Finished method runs and evaluations are kept (`--resume`), so an interrupted benchmark continues.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean, stdev
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from torch import Tensor, nn

from classifiers.metrics import predict_proba
from classifiers.models import to_input
from erasure.config import load_config, to_dict
from erasure.datasets import ImageSet
from erasure.evaluation.fid import fid_kid
from erasure.io import MANIFEST, RunDir, atomic_open, check_resumable, read_json
from erasure.media import image_grid, save_png
from pipelines.bench_attack import attack_columns, attack_rates, check_attacks
from pipelines.bench_config import CONCEPT_SEPARATOR, BenchEraseConfig
from pipelines.bench_data import real_sets
from pipelines.loading import load_base_pipeline, load_erased_pipeline
from pipelines.methods import SD_METHODS
from pipelines.sd_config import DEFAULT_LR, SDEraseConfig
from pipelines.testbed_captions import CLASSES, QUALITY_PROMPT, caption, prompt_groups
from pipelines.testbed_eval import generate, load_judge

GROUPS = ("forget", "held_out", "synonyms")
CHILD = """import sys
from erasure.cli import main
code = main(sys.argv[2:])
peak = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
open(sys.argv[1], "w").write(peak[0] if peak else "")
sys.exit(code)
"""
"""The erasure process: `erasure sd`, then its own peak resident memory (VmHWM: the high-water mark of its address
space since exec; rusage's maxrss would include the benchmark process's memory, inherited through fork)."""
COST_FILE, EVAL_FILE = "cost.json", "bench.json"
PER_CLASS_GROUPS = ("forget", "held_out", "synonyms")
"""The prompt groups written for each erased class (the target prompt belongs to none)."""
RESUMABLE_KEYS = ("resume", "overwrite", "concepts", "methods", "retrained", "attacks", "seeds", "batch_size",
                  "threads", "jobs")
"""Settings a resumed benchmark may change (rows and columns to add, how it runs); any other change would mix
results judged or erased under different settings, and is refused."""


def judge_pipeline(pipe: StableDiffusionPipeline, judge: nn.Module, classes: list[str], seed: int,
                   config: BenchEraseConfig, target: str | None = None,
                   ) -> tuple[dict[str, Any], Tensor, dict[str, np.ndarray]]:
    """Forgetting per group, retained accuracy, the retained images' judge features and one image per prompt."""
    groups = prompt_groups(classes, target)
    erased = torch.tensor([CLASSES.index(name) for name in classes])
    result: dict[str, Any] = {}
    features, samples = None, {}
    for name, pairs in groups.items():
        prompts = [text for text, _ in pairs for _ in range(config.per_prompt)]
        labels = torch.tensor([label for _, label in pairs]).repeat_interleave(config.per_prompt)
        seeds = [seed * 100_000 + i % config.per_prompt for i in range(len(prompts))]
        images = generate(pipe, prompts, seeds, steps=config.steps, guidance=config.guidance,
                          batch_size=config.batch_size)
        predicted = predict_proba(judge, ImageSet(images, labels)).argmax(1)
        if name == "retained":
            result["retained_accuracy"] = round(100.0 * float((predicted == labels).float().mean()), 2)
            with torch.no_grad():
                features = torch.cat([judge.features(to_input(images[i:i + 500])) for i in
                                      range(0, len(images), 500)])
        else:
            hit = torch.isin(predicted, erased).float()
            result[f"{name}_erased_pct"] = round(100.0 * float(hit.mean()), 2)
            if len(classes) > 1 and name in PER_CLASS_GROUPS:  # "for every concept" goals need each class
                for index, erased_class in zip(erased.tolist(), classes, strict=True):
                    result[per_class_key(name, erased_class)] = round(100.0 * float(hit[labels == index].mean()), 2)
        for (text, _), start in zip(pairs, range(0, len(prompts), config.per_prompt), strict=True):
            samples[text] = images[start].permute(1, 2, 0).numpy()
    return result, features, samples


def erase_args(config: BenchEraseConfig, classes: list[str], method: str, seed: int, out: Path,
               images: dict[str, str] | None = None) -> dict[str, Any]:
    """The `erasure sd` config of one method run (`images`: its forget/retain image folders, if not generated)."""
    others = [caption(QUALITY_PROMPT, c) for c in CLASSES if c not in classes]
    concepts = [{"forget": caption(QUALITY_PROMPT, c), "target": config.target_of(method, c, classes)}
                for c in classes]
    values = {"model": config.model, "method": method, "seed": seed, "out": str(out), "preserve": others,
              "grid_seeds": 0, "export_delta": False, "resolution": 16, "generation_steps": config.steps,
              "generation_guidance": config.guidance, **(images or {}), **config.erase,
              **config.per_method.get(method, {})}
    spec = SD_METHODS[method]
    if spec.trains and config.lr_scale != 1:
        values["lr"] = float(f'{config.lr_scale * values.get("lr", spec.defaults.get("lr", DEFAULT_LR)):.6g}')
    values["forget_prompt"], values["remap_prompt"] = concepts[0]["forget"], concepts[0]["target"]
    return {"values": values, "concepts": concepts[1:]}


def real_images(config: BenchEraseConfig, classes: list[str], method: str, folder: Path) -> dict[str, str] | None:
    """A trained method's real forget/retain folders under `folder` (written once per size) when `images` is
    'real'; None otherwise."""
    if config.images != "real" or not SD_METHODS[method].trains:
        return None
    count = {**config.erase, **config.per_method.get(method, {})}.get("num_images", SDEraseConfig.num_images)
    return real_sets(classes, count, folder / f"real{count}", config.data_dir)


def run_method(config: BenchEraseConfig, classes: list[str], method: str, seed: int, folder: Path,
               images: dict[str, str] | None = None) -> dict[str, Any]:
    """Erase in a child process; returns its cost. A finished run is kept when it was made from the same settings
    (its erase.yaml and concepts file), else it is erased again."""
    cost_file, run = folder / COST_FILE, folder / "run"
    spec = erase_args(config, classes, method, seed, run, images)
    values = dict(spec["values"], overwrite=True)
    config_file, files = folder / "erase.yaml", {}  # JSON is YAML
    if spec["concepts"]:
        concepts_file = folder / "concepts.yaml"
        values["concepts"], files[concepts_file] = str(concepts_file), json.dumps(spec["concepts"])
    files[config_file] = json.dumps(values)
    if cost_file.is_file() and (run / "manifest.json").is_file() and \
            read_json(run / "manifest.json").get("status") == "finished" and \
            all(f.is_file() and f.read_text() == text for f, text in files.items()):
        return read_json(cost_file)
    folder.mkdir(parents=True, exist_ok=True)
    for file, text in files.items():
        file.write_text(text)
    env = dict(os.environ, OMP_NUM_THREADS=str(config.threads), HF_HUB_OFFLINE="1")
    peak_file = folder / "peak_kb.txt"
    command = [sys.executable, "-c", CHILD, str(peak_file), "sd", "--config", str(config_file)]
    started = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - started
    if status != 0:
        tail = (folder / "log.txt").read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{method} on {'+'.join(classes)} (seed {seed}) failed: {tail[0]}; see {folder}/log.txt")
    peak = peak_file.read_text().strip() if peak_file.is_file() else ""
    cost = {"seconds": round(seconds, 2), "peak_rss_mb": round(int(peak) / 1024, 1) if peak.isdigit() else None}
    with atomic_open(cost_file, "w") as handle:
        json.dump(cost, handle)
    return cost


def evaluate_run(config: BenchEraseConfig, pipe: StableDiffusionPipeline, judge: nn.Module, classes: list[str],
                 seed: int, base_features: Tensor, folder: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Judge one pipeline (cached in <folder>/bench.json; its sample images are regenerated for the grid)."""
    cached = folder / EVAL_FILE
    result, features, samples = judge_pipeline(pipe, judge, classes, seed, config) if not cached.is_file() else (
        read_json(cached), None, {})
    if features is not None:
        result["feature_distance"] = round(fid_kid(features, base_features, seed=seed)["fid"], 3) \
            if base_features is not None else 0.0
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_open(cached, "w") as handle:
            json.dump(result, handle)
    return result, samples


def per_class_key(group: str, name: str) -> str:
    """The result key of one erased class's share in a prompt group, e.g. `forget_erased_pct[ship]`."""
    return f"{group}_erased_pct[{name}]"


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean (and std over seeds) of every number in a method's per-seed rows (that every row has: results judged
    before per-class shares were recorded have none)."""
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float)) and all(k in r for r in rows)]
    return {k: {"mean": round(mean(r[k] for r in rows), 3),
                "std": round(stdev(r[k] for r in rows), 3) if len(rows) > 1 else None} for k in keys}


JUDGED = (("target_erased_pct", "target prompt %"), ("forget_erased_pct", "forget prompt %"),
          ("held_out_erased_pct", "held-out templates %"), ("synonyms_erased_pct", "synonyms %"),
          ("retained_accuracy", "retained acc. %"), ("feature_distance", "feature dist."))
COST = (("seconds", "seconds"), ("peak_rss_mb", "peak MB"))


def report(config: BenchEraseConfig, results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """report.md: one table per concept set, rows base / retrained / methods."""
    columns = [*JUDGED, *attack_columns(config), *COST]
    lines = ["# Erasure benchmark on the CPU testbed", "",
             f"Command: `erasure bench erase` with {json.dumps(to_dict(config))}", "",
             "Percentages of images the judge calls an erased class (lower is better; the base model's images of "
             "the target prompt give the floor an erasure towards it can reach), the judge's accuracy on the "
             "other classes, the Fréchet distance of its features to the base model's generations of them (not "
             "FID), the share of attacked prompts (each erased class's quality prompt and held-out templates) "
             "judged as their class before and after each attack, and the erasure's wall time and peak memory; "
             "mean ± std over the seeds.", ""]
    for concept, rows in results.items():
        lines += [f"## {concept}", "", "| model | " + " | ".join(label for _, label in columns) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        for name, summary in rows.items():
            cells = []
            for key, _ in columns:
                value = summary.get(key)
                cells.append("—" if value is None else f"{value['mean']:g}" +
                             (f" ± {value['std']:g}" if value["std"] is not None else ""))
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", *per_class_table(concept.split(CONCEPT_SEPARATOR), rows)]
    return "\n".join(lines)


def per_class_table(classes: list[str], rows: dict[str, dict[str, Any]]) -> list[str]:
    """For several classes erased at once, each class's share (forget prompt / held-out templates / synonyms, mean
    over the seeds) per model; nothing for one class."""
    if len(classes) < 2:
        return []
    lines = ["Per erased class: forget prompt / held-out templates / synonyms %, mean over the seeds.", "",
             "| model | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for name, summary in rows.items():
        lines.append(f"| {name} | " + " | ".join(_class_shares(summary, c) for c in classes) + " |")
    return [*lines, ""]


def _class_shares(summary: dict[str, Any], erased_class: str) -> str:
    """One cell of the per-class table: the class's mean share in each group, '—' where it was not recorded."""
    keys = [per_class_key(group, erased_class) for group in PER_CLASS_GROUPS]
    return " / ".join(f"{summary[k]['mean']:g}" if k in summary else "—" for k in keys)


def check_resume(config: BenchEraseConfig) -> None:
    """Refuse a resume that changes how finished results were judged; an attack budget may be set on resuming a
    benchmark that ran no attacks (nothing was judged under another budget)."""
    manifest = Path(config.out) / MANIFEST
    if config.resume and not config.overwrite and manifest.is_file():
        attacked = read_json(manifest).get("config", {}).get("attacks")
        check_resumable(Path(config.out), to_dict(config), RESUMABLE_KEYS + (() if attacked else ("attack",)))


def bench(config: BenchEraseConfig) -> dict[str, Any]:
    """Run the benchmark; writes metrics.json, report.md and grid.png under `out`."""
    torch.set_num_threads(config.threads)
    for method in config.methods:  # every method's options are checked before any work
        for classes in config.class_sets():
            load_config(SDEraseConfig, None, erase_args(config, classes, method, config.seeds[0], Path("x"))["values"])
    check_attacks(config)
    check_resume(config)
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume, reopen=True)
    run.start(to_dict(config), seed=config.seeds[0], device="cpu", kind="bench-erase")
    judge = load_judge(config.judge)
    base = load_base_pipeline(config.model)
    results: dict[str, dict[str, dict[str, Any]]] = {}
    grid_rows: list[tuple[str, dict[str, np.ndarray]]] = []
    for concept, classes in zip(config.concepts, config.class_sets(), strict=True):
        per_model: dict[str, list[dict[str, Any]]] = {}
        runs = run.path / "runs" / concept
        images = {method: real_images(config, classes, method, runs / "data") for method in config.methods}
        for seed in config.seeds:
            base_result, base_features, base_samples = judge_pipeline(base, judge, classes, seed, config,
                                                                      target=config.target)
            attacked = attack_rates(config, config.model, None, classes, seed, runs / "base" / f"seed{seed}")
            per_model.setdefault("base", []).append(dict(base_result, feature_distance=0.0, **attacked))
            if seed == config.seeds[0] and concept == config.concepts[0]:
                grid_rows.append(("base", base_samples))
            if concept in config.retrained:
                gold = load_base_pipeline(config.retrained[concept])
                folder = runs / "retrained" / f"seed{seed}"
                result, samples = evaluate_run(config, gold, judge, classes, seed, base_features, folder)
                attacked = attack_rates(config, config.retrained[concept], None, classes, seed, folder)
                per_model.setdefault("retrained", []).append({**result, **attacked})
                if seed == config.seeds[0] and concept == config.concepts[0] and samples:
                    grid_rows.append(("retrained", samples))
            folders = {method: runs / method / f"seed{seed}" for method in config.methods}
            with ThreadPoolExecutor(max_workers=config.jobs) as pool:  # threads that wait on child processes
                costs = {method: pool.submit(run_method, config, classes, method, seed, folder, images[method])
                         for method, folder in folders.items()}
                for method, folder in folders.items():  # judged in order, each as soon as its run is done
                    cost = costs[method].result()
                    erased = load_erased_pipeline(config.model, folder / "run")
                    result, samples = evaluate_run(config, erased, judge, classes, seed, base_features, folder)
                    attacked = attack_rates(config, config.model, folder / "run", classes, seed, folder)
                    per_model.setdefault(method, []).append({**result, **attacked, **cost})
                    if seed == config.seeds[0] and concept == config.concepts[0] and samples:
                        grid_rows.append((method, samples))
        results[concept] = {name: summarise(rows) for name, rows in per_model.items()}
    if grid_rows:
        prompts = list(grid_rows[0][1])[:8]
        save_png(run.path / "grid.png", image_grid([row[1][p] for row in grid_rows for p in prompts if p in row[1]],
                                                   columns=len(prompts), cell=64))
    with atomic_open(run.path / "report.md", "w") as handle:
        handle.write(report(config, results))
    metrics = {"concepts": results, "separator": CONCEPT_SEPARATOR}
    run.finish(metrics)
    print(json.dumps({concept: {name: {k: v["mean"] for k, v in row.items()} for name, row in rows.items()}
                      for concept, rows in results.items()}))
    return metrics
