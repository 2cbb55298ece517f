"""Protocol ddpm-cifar10-v1: how well a class-conditional DDPM forgot one class and kept the others.

For the forgotten class, UA is the share of its generated images that the CIFAR-10 judge does not
assign to it. For each retained class, the judge's accuracy on its generations. For all retained
classes together, the Fréchet distance of their generations to the CIFAR-10 test images of those
classes: FID with the standard Inception features when they load, otherwise the judge's penultimate
features, reported as "feature distance" and never under the name FID. The same seeds are used for
the evaluated model and its baseline (the model it was unlearned from), so the two are paired.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from classifiers.features import ClassifierFeatures
from classifiers.metrics import predict_proba
from classifiers.models import MODEL_FILE
from classifiers.models import load_model as load_classifier
from erasure.accel import resolve_device, resolve_dtype
from erasure.config import from_dict, to_dict
from erasure.datasets import ImageSet, load_cifar10
from erasure.digest import key_digest, tensor_digest, weights_digest
from erasure.errors import ConfigError
from erasure.evaluation.fid import FeatureError, build_extractor, fid_kid
from erasure.evaluation.protocol import Grid, Protocol, ProtocolCard, Result, register, run_protocol
from erasure.evaluation.report import grid_links, markdown_table, settings_table
from erasure.io import MANIFEST, atomic_dir, finished_run, read_json, write_json
from pipelines.ddpm import load_model, sample_batched
from pipelines.ddpm_config import CIFAR10_CLASSES, DDPMEvalConfig, DDPMTrainConfig, class_index

SEED_STRIDE = 100_003
GRID_COLUMNS = 8
SIDE_FILE = "side.json"
ROWS_FILE = "grid_rows.pt"
SIDE_SETTINGS = ("n_forget", "n_per_class", "guidance", "steps", "scheduler", "batch_size", "seed")


def _features(config: DDPMEvalConfig, device: torch.device) -> tuple[nn.Module, str, str | None]:
    """The extractor, the metric's name ('fid' or 'feature_distance') and why Inception was not used."""
    if config.features in ("auto", "inception"):
        try:
            return build_extractor("inception", device), "fid", None
        except FeatureError as error:
            if config.features == "inception":
                raise
            reason = str(error)
    else:
        reason = "--features classifier was asked for"
    return ClassifierFeatures(config.judge).eval().to(device), "feature_distance", reason


@torch.inference_mode()
def _embed(extractor: nn.Module, images: Tensor, device: torch.device, batch_size: int = 500) -> Tensor:
    return torch.cat([extractor(images[i:i + batch_size].to(device)).double().cpu()
                      for i in range(0, len(images), batch_size)])


def _forget_class(config: DDPMEvalConfig, manifest: dict[str, Any]) -> int:
    """--forget, else the unlearn run's forgotten class, else a retrain run's excluded class."""
    value = config.forget or manifest["config"].get("forget") or manifest["config"].get("exclude")
    if value is None:
        raise ConfigError(f"'{config.run}' forgot no class; pass --forget <class> to say which class to judge")
    return class_index(value, "forget")


def _baseline(config: DDPMEvalConfig, manifest: dict[str, Any]) -> str | None:
    """--baseline: a run, 'none' for no comparison, or 'auto' for the run an unlearn run started from."""
    if config.baseline == "auto":
        return manifest["config"].get("run") if manifest.get("kind") == "ddpm-unlearn" else None
    return None if config.baseline.lower() == "none" else config.baseline


def _train_config(manifest: dict[str, Any]) -> DDPMTrainConfig:
    """The config of the training run behind a DDPM run (data folder, resolution)."""
    if manifest.get("kind") == "ddpm-unlearn":
        manifest = read_json(Path(manifest["config"]["run"]) / MANIFEST)
    return from_dict(DDPMTrainConfig, manifest["config"])


def check_judge_size(judge: nn.Module, resolution: int, judge_dir: str) -> None:
    """The judge must have been trained at the DDPM's resolution (it would misjudge resized images)."""
    if judge.spec.image_size != resolution:
        raise ConfigError(f"the judge '{judge_dir}' classifies {judge.spec.image_size}x{judge.spec.image_size} images "
                          f"but the DDPM generates {resolution}x{resolution}; pass --judge <a classifier trained with "
                          f"`erasure classifier train --dataset cifar10 --resolution {resolution}`>")


def generate(config: DDPMEvalConfig, unet: nn.Module, scheduler: Any, forget: int, device: torch.device
             ) -> dict[int, Tensor]:
    """uint8 images per class: n_forget of the forgotten class, n_per_class of every other (seeded per image)."""
    unet.to(device).eval()
    out = {}
    for label in range(len(CIFAR10_CLASSES)):
        n = config.n_forget if label == forget else config.n_per_class
        seeds = [config.seed + SEED_STRIDE * label + i for i in range(n)]
        out[label] = sample_batched(unet, scheduler, [label] * n, seeds, guidance=config.guidance, steps=config.steps,
                                    sampler=config.scheduler, batch_size=config.batch_size,
                                    dtype=resolve_dtype("auto", device))
    return out


def judge_side(images: dict[int, Tensor], forget: int, judge: nn.Module, extractor: nn.Module,
               reference: Tensor, device: torch.device, seed: int) -> dict[str, Any]:
    """UA, per-class accuracy and the distance of the retained classes' generations for one model."""
    accuracy = {}
    for label, batch in images.items():
        predicted = predict_proba(judge, ImageSet(batch.to(device), torch.full((len(batch),), label))).argmax(1)
        accuracy[CIFAR10_CLASSES[label]] = 100.0 * float((predicted == label).float().mean())
    retained = torch.cat([batch for label, batch in images.items() if label != forget])
    distance = fid_kid(_embed(extractor, retained, device), reference, seed=seed)
    kept = [v for k, v in accuracy.items() if k != CIFAR10_CLASSES[forget]]
    return {"UA": 100.0 - accuracy[CIFAR10_CLASSES[forget]], "retained_accuracy": sum(kept) / len(kept),
            "class_accuracy": accuracy, "distance": distance["fid"], "kid_mean": distance["kid_mean"],
            "kid_std": distance["kid_std"], "generated_retained": distance["images"],
            "reference_images": distance["reference_images"]}


def _grid(side: str, rows: dict[int, Tensor]) -> Grid:
    """One row of the first images per class (rows in class order)."""
    ordered = [rows[label][:GRID_COLUMNS] for label in sorted(rows)]
    return Grid(side, [a for row in ordered for a in row.permute(0, 2, 3, 1).numpy()], columns=GRID_COLUMNS, cell=64)


def relative_change(after: float, before: float) -> float | None:
    """(after - before) / before, or None when before is 0."""
    return (after - before) / abs(before) if before else None


@dataclass
class DDPMInputs:
    """The settings, the runs to compare, the class to judge, the judge, the features and the reference."""

    config: DDPMEvalConfig
    sides: dict[str, str]
    forget: int
    judge: nn.Module
    extractor: nn.Module
    metric: str
    fallback: str | None
    reference: Tensor
    device: torch.device

    @cached_property
    def judging(self) -> dict[str, Any]:
        """What every side's result depends on besides its model (the cache key's shared part, hashed once per
        evaluation): the protocol, the judge, the distance's features and reference, the class, the sampling."""
        return {"protocol": DDPMProtocol.card.id, "judge": weights_digest(self.judge),
                "extractor": weights_digest(self.extractor), "reference": tensor_digest(self.reference),
                "forget": self.forget, "device": self.device.type,
                **{key: getattr(self.config, key) for key in SIDE_SETTINGS}}


def judged_side(inputs: DDPMInputs, run_dir: str) -> tuple[dict[str, Any], dict[int, Tensor]]:
    """One model's judged generations and the first images of each class: sampled, or read from `--cache` where
    the same weights were judged the same way before (the result then names where it came from)."""
    config = inputs.config
    unet, scheduler = load_model(run_dir)
    kept = Path(config.cache) / _side_key(inputs, unet, scheduler) if config.cache else None
    if kept is not None and (kept / SIDE_FILE).is_file():
        return {**read_json(kept / SIDE_FILE), "reused_from": str(kept)}, torch.load(kept / ROWS_FILE)
    start = time.perf_counter()
    images = generate(config, unet, scheduler, inputs.forget, inputs.device)
    seconds = time.perf_counter() - start
    judged = {**judge_side(images, inputs.forget, inputs.judge, inputs.extractor, inputs.reference, inputs.device,
                           config.seed),
              "sampling_seconds": round(seconds, 3),
              "images_per_second": round(sum(len(b) for b in images.values()) / seconds, 3)}
    rows = {label: batch[:GRID_COLUMNS].clone() for label, batch in images.items()}
    if kept is not None:
        with atomic_dir(kept) as folder:
            write_json(folder / SIDE_FILE, judged)
            torch.save(rows, folder / ROWS_FILE)
    return judged, rows


def _side_key(inputs: DDPMInputs, unet: nn.Module, scheduler: Any) -> str:
    """What a side's result depends on: its model (weights and scheduler) and how every side is judged."""
    return key_digest({"unet": weights_digest(unet), "scheduler": dict(scheduler.config), **inputs.judging})


class DDPMProtocol(Protocol):
    """Generate each class from the evaluated run (and its baseline), judge them and measure the distance."""

    card = ProtocolCard("ddpm-cifar10", 1, "Class forgetting in a class-conditional DDPM: UA, retained-class "
                                           "accuracy and feature distance")
    kind = "eval-ddpm"

    def compute(self, inputs: DDPMInputs, out: Path) -> Result:
        config, forget = inputs.config, inputs.forget
        results: dict[str, Any] = {}
        grids = []
        for side, run_dir in inputs.sides.items():
            judged, rows = judged_side(inputs, run_dir)
            results[side] = {"run": run_dir, **judged}
            grids.append(_grid(side, rows))
        metrics: dict[str, Any] = {
            "forget_class": CIFAR10_CLASSES[forget], "distance_metric": inputs.metric,
            "features": inputs.extractor.describe(), "inception_unavailable": inputs.fallback, **results,
            "settings": {k: v for k, v in to_dict(config).items() if k != "overwrite"}}
        if "baseline" in results:
            metrics["change"] = {key: relative_change(results["evaluated"][key], results["baseline"][key])
                                 for key in ("retained_accuracy", "distance")}
        line = ", ".join(f"{side}: UA {r['UA']:.1f}%, retained acc {r['retained_accuracy']:.1f}%, "
                         f"{inputs.metric} {r['distance']:.4g}" for side, r in results.items())
        return Result(metrics, f"({CIFAR10_CLASSES[forget]}) {line}", grids)

    def report_sections(self, metrics: dict[str, Any], grids: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return _sections(metrics, grids)


PROTOCOL = register(DDPMProtocol())


def evaluate_ddpm(config: DDPMEvalConfig) -> dict[str, Any]:
    """Check the runs and the judge, then run the protocol; writes metrics.json, report.md and one grid per model."""
    manifest = finished_run(config.run, "`erasure ddpm`")
    finished_run(config.judge, "`erasure classifier train`")
    forget = _forget_class(config, manifest)
    baseline = _baseline(config, manifest)
    device = resolve_device(config.device)
    train_config = _train_config(manifest)
    judge = load_classifier(Path(config.judge) / MODEL_FILE).to(device).eval()
    check_judge_size(judge, train_config.resolution, config.judge)
    extractor, metric, fallback = _features(config, device)

    def reference_inputs(_: Path) -> DDPMInputs:
        test = load_cifar10(train_config.data_dir, resolution=train_config.resolution).test
        reference = _embed(extractor, test.images[test.labels != forget], device)
        sides = {"evaluated": config.run, **({"baseline": baseline} if baseline else {})}
        return DDPMInputs(config, sides, forget, judge, extractor, metric, fallback, reference, device)

    out = Path(config.out) if config.out else Path(config.run) / "eval-ddpm"
    return run_protocol(PROTOCOL, reference_inputs, out=out, config=to_dict(config), seed=config.seed,
                        device=str(device), overwrite=config.overwrite)


def _sections(metrics: dict[str, Any], grids: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """report.md: the summary table, per-class accuracy, what the distance is, settings, grids."""
    name = "FID" if metrics["distance_metric"] == "fid" else "feature distance (not FID)"
    sides = [s for s in ("evaluated", "baseline") if s in metrics]
    rows = [(side, metrics[side]["run"], metrics[side]["UA"], metrics[side]["retained_accuracy"],
             metrics[side]["distance"], metrics[side]["kid_mean"]) for side in sides]
    summary = markdown_table(["model", "run", f"UA (% of {metrics['forget_class']} not judged so)",
                              "retained-class accuracy (%)", name, "KID (same features)"], rows)
    if "change" in metrics:
        changes = metrics["change"]
        summary += "\n\nRelative change vs the baseline: retained accuracy " + _percent(changes["retained_accuracy"]) \
                   + f", {name} " + _percent(changes["distance"]) + "."
    features = metrics["features"]
    notes = f"Distance features: {features['model']} ({features['num_features']} dimensions)."
    if metrics["inception_unavailable"]:
        notes += f" The Inception features were not used: {metrics['inception_unavailable']}"
    classes = markdown_table(["class", *sides], [(c, *(metrics[s]["class_accuracy"][c] for s in sides))
                                                 for c in CIFAR10_CLASSES])
    return [("Result", summary + "\n\n" + notes), ("Judge's accuracy per class (%)", classes),
            ("Settings", settings_table(metrics["settings"])),
            ("Samples (one row per class, in class order)", grid_links(grids))]


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"
