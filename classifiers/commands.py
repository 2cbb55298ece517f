"""Handlers of `erasure classifier {train,unlearn,compare}` and `erasure mask compute`."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from classifiers.config import CompareConfig, MaskConfig, TrainConfig, UnlearnConfig
from classifiers.data import ForgetSplit, forget_split
from classifiers.loop import Loop, Streams
from classifiers.method_settings import METHODS
from classifiers.methods import FineTune, Method, build_method, forget_loss, image_batches
from classifiers.metrics import PROTOCOL, accuracy, average_gap, evaluate, predict_proba
from classifiers.models import MODEL_FILE, Classifier, build_model, load_model, save_model, spec_for
from classifiers.privacy import ForgetMembershipAttack
from classifiers.report import mean_and_std, write_comparison
from classifiers.search import search
from erasure.accel import make_accelerator
from erasure.config import from_dict, to_dict
from erasure.datasets import Dataset, ImageSet, load_dataset
from erasure.errors import RunDirError
from erasure.io import RunDir, finished_run, read_json, reusable_run, write_json
from erasure.saliency import Mask, compute_mask
from erasure.trainer import tracker_options
from erasure.training import evaluating

MASK_FILE = "mask.safetensors"
RUN_PLACEMENT_KEYS = ("out", "retrain", "resume", "overwrite", "log_with")
"""Settings of a compared run that say where it writes and how it runs, not what it computes."""
SHADOW_SEED = 10_000  # shadow k of comparison seed s trains with seed SHADOW_SEED + 100 s + k


def _accelerator(accelerator: Accelerator | None, config: TrainConfig | UnlearnConfig) -> Accelerator:
    """The given accelerator, or one logging to the config's tracker (checked first: a one-line error)."""
    options = tracker_options(config.log_with, config.out)
    return accelerator if accelerator is not None else make_accelerator(**options)


def _original(path: str) -> tuple[TrainConfig, Classifier]:
    manifest = finished_run(path, "`erasure classifier train`")
    config = from_dict(TrainConfig, manifest["config"], source=f"'{path}/manifest.json'")
    return config, load_model(Path(path) / MODEL_FILE)


def dataset_for(config: TrainConfig, device: torch.device) -> Dataset:
    """The dataset a train config names, on `device` (with its train_limit applied)."""
    data = load_dataset(config.dataset, config.data_dir, config.split_seed, config.resolution)
    if config.train_limit:
        data.train = data.train.subset(torch.arange(min(config.train_limit, len(data.train))))
    return data.to(device)


def train(config: TrainConfig, accelerator: Accelerator | None = None, keep: torch.Tensor | None = None
          ) -> dict[str, Any]:
    """Train the original classifier on the whole training split (or on its examples at `keep`)."""
    accelerator = _accelerator(accelerator, config)
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume, main_process=accelerator.is_main_process)
    data = dataset_for(config, accelerator.device)
    run.start(to_dict(config), seed=config.seed, device=str(accelerator.device), kind="classifier-train")
    if keep is not None:
        data.train = data.train.subset(keep.to(data.train.labels.device))
        if accelerator.is_main_process:
            write_json(run.path / "train_indices.json", {"train_index": keep.tolist()})
    torch.manual_seed(config.seed)
    model = build_model(spec_for(config.arch, config.dataset, data.image_shape, data.num_classes, config.width))
    loop = Loop(model, FineTune(config), Streams(None, data.train), config, run, num_classes=data.num_classes,
                augment_images=config.augment, accelerator=accelerator)
    stats = loop.run_steps()
    model = loop.unwrapped
    metrics = {name: _accuracy(model, subset) for name, subset in
               (("train_acc", data.train), ("val_acc", data.val), ("test_acc", data.test))}
    metrics.update(stats)
    if accelerator.is_main_process:
        save_model(model, run.path / MODEL_FILE)
        run.finish(metrics)
        print(f"trained {config.arch} on {config.dataset}: test accuracy {metrics['test_acc']:.2f}% "
              f"in {stats['train_seconds']:.1f}s -> {run.path}")
    accelerator.wait_for_everyone()
    return metrics


def _accuracy(model: torch.nn.Module, subset: ImageSet) -> float:
    return accuracy(predict_proba(model, subset), subset.labels)


def _saliency_mask(model: Classifier, split: ForgetSplit, data: Dataset, ratio: float | None,
                   threshold: float | None, params: str | None, batch_size: int, accelerator: Accelerator,
                   soft_temperature: float | None = None) -> Mask:
    """The SalUn mask: top |gradient| of the forget cross-entropy (model in eval mode, so BN stats stay)."""
    with evaluating(model):
        return compute_mask(model, image_batches(split.forget(data), batch_size), forget_loss, ratio=ratio,
                            threshold=threshold, params=params, accelerator=accelerator, loss_name="cross_entropy",
                            soft_temperature=soft_temperature)


def unlearn(config: UnlearnConfig, accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Unlearn the forget set from the original model with one method; returns its metrics."""
    accelerator = _accelerator(accelerator, config)
    original_config, model = _original(config.original)
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume, main_process=accelerator.is_main_process)
    data = dataset_for(original_config, accelerator.device)
    split = forget_split(config.forget, data, seed=config.seed)
    method = build_method(config)
    run.start(to_dict(config), seed=config.seed, device=str(accelerator.device), kind="classifier-unlearn")
    if accelerator.is_main_process:
        write_json(run.path / "forget_indices.json",
                   {"spec": config.forget, "train_index": split.forget_index.tolist()})
    optim = method.optim_config(config)
    if method.from_scratch:
        optim = replace(original_config, seed=config.seed, checkpoint_every=config.checkpoint_every)
        torch.manual_seed(config.seed)
        model = build_model(model.spec)
    model.to(accelerator.device)
    started = time.perf_counter()
    forget, retain = split.forget(data), split.retain(data)
    edited = method.edit(model, forget, retain)
    if edited is not None and accelerator.is_main_process:
        edited.save(run.path / MASK_FILE)
    stats: dict[str, Any] = {"steps": 0}
    if method.trains:
        mask = _method_mask(config, method, edited, model, split, data, run, accelerator)
        loop = Loop(model, method, Streams(forget, retain), optim, run, num_classes=data.num_classes,
                    augment_images=original_config.augment, accelerator=accelerator, mask=mask,
                    forget_batch_size=config.forget_batch_size)
        stats = loop.run_steps(_forget_accuracy_at_most(config.stop_forget_acc, forget), config.stop_check_every)
        model = loop.unwrapped
    run_seconds = time.perf_counter() - started
    metrics: dict[str, Any] = {**PROTOCOL.stamp(), "method": config.method, "forget": config.forget,
                               "forget_size": len(split.forget_index), **evaluate(model, data, split, config.seed),
                               "RTE": run_seconds, **stats}
    if config.retrain:
        metrics["Avg.Gap"] = average_gap(metrics, read_json(Path(config.retrain) / "metrics.json"))
    if accelerator.is_main_process:
        save_model(model, run.path / MODEL_FILE)
        run.finish(metrics)
    accelerator.wait_for_everyone()
    return metrics


def _forget_accuracy_at_most(target: float | None, forget: ImageSet) -> Callable[[torch.nn.Module], bool] | None:
    if target is None:
        return None
    return lambda model: _accuracy(model, forget) <= target


def _method_mask(config: UnlearnConfig, method: Method, edited: Mask | None, model: Classifier, split: ForgetSplit,
                 data: Dataset, run: RunDir, accelerator: Accelerator) -> Mask | None:
    """The mask training runs under: none, the one the method's edit made, or the saliency mask (saved)."""
    if not method.uses_mask:
        return None
    if edited is not None:
        return edited
    saved = run.path / MASK_FILE
    if run.resumed and saved.is_file():
        return Mask.load(saved, model)
    settings = config.settings
    if settings.mask:
        mask = Mask.load(settings.mask, model)
    else:
        temperature = settings.mask_temperature if settings.mask_type == "soft" else None
        mask = _saliency_mask(model, split, data, settings.mask_ratio, None, None, config.batch_size, accelerator,
                              temperature)
    if accelerator.is_main_process:
        mask.save(saved)
    return mask


def compare(config: CompareConfig) -> dict[str, Any]:
    """Original, retrain and every method on one forget set; writes report.md, metrics.json, a plot.

    With several `seeds`, everything runs once per seed (in out/seed<k>) and the report gives mean ± std.
    """
    accelerator = make_accelerator(**tracker_options(config.log_with(), config.out))
    run = RunDir(config.out, overwrite=config.overwrite, resume=config.resume, main_process=accelerator.is_main_process,
                 reopen=True)
    run.start(to_dict(config), seed=config.seed, device=str(accelerator.device), kind="classifier-compare")
    seeds = config.seeds or [config.seed]
    if len(seeds) == 1:
        summary = _compare_seed(replace(config, seed=seeds[0]), run.path, accelerator)
    else:
        per_seed = {str(s): _compare_seed(replace(config, seed=s), run.path / f"seed{s}", accelerator) for s in seeds}
        summary = mean_and_std(per_seed)
    if accelerator.is_main_process:
        table = write_comparison(run.path, summary)
        run.finish(summary)
        print(table)
    return summary


def _compare_seed(config: CompareConfig, folder: Path, accelerator: Accelerator) -> dict[str, Any]:
    """The comparison for `config.seed`, with its runs in `folder`: original, retrain, then each method."""
    original = config.original or str(folder / "original")
    if config.original is None:
        settings = config.train_config(out=original, resume=True)
        _once(folder / "original", settings, lambda: train(settings, accelerator))
    retrain = config.retrain or str(folder / "retrain")
    results: dict[str, dict[str, Any]] = {"retrain": _retrain_metrics(config, original, retrain, accelerator)}
    train_config, model = _original(original)
    data = dataset_for(train_config, accelerator.device)
    split = forget_split(config.forget, data, seed=config.seed)
    runs, searches = {"retrain": Path(retrain)}, {}
    for method in [m for m in config.methods if m != "retrain"]:
        runs[method] = folder / method
        if method in config.search:
            searches[method] = _search(config, method, original, retrain, folder, data, split, accelerator)
            runs[method] = Path(searches[method]["selected_run"])
        settings = config.unlearn_config(method, (searches.get(method) or {}).get("selected_settings"),
                                         original=original, out=str(runs[method]), retrain=retrain, resume=True)
        results[method] = _once(runs[method], settings, lambda s=settings: unlearn(s, accelerator))
    original_metrics = evaluate(model.to(accelerator.device), data, split, config.seed)
    original_metrics["Avg.Gap"] = average_gap(original_metrics, read_json(Path(retrain) / "metrics.json"))
    if config.lira_shadows:
        attack = ForgetMembershipAttack(_shadows(config, folder, split, accelerator), data, split)
        original_metrics.update(attack(model))
        for name, path in runs.items():
            results[name] = {**results[name], **attack(load_model(path / MODEL_FILE).to(accelerator.device))}
    summary = {**PROTOCOL.stamp(), "forget": config.forget, "original": original_metrics, "methods": results}
    return {**summary, "search": searches} if searches else summary


def _search(config: CompareConfig, method: str, original: str, retrain: str, folder: Path, data: Dataset,
            split: ForgetSplit, accelerator: Accelerator) -> dict[str, Any]:
    """The method's grid search (each point a run in folder/search/<method>/<settings>), selected on validation."""
    def run_point(out: Path, point: dict[str, Any]) -> None:
        settings = config.unlearn_config(method, point, original=original, out=str(out), retrain=retrain, resume=True)
        _once(out, settings, lambda: unlearn(settings, accelerator))

    reference = load_model(Path(retrain) / MODEL_FILE).to(accelerator.device)
    result = search(config.search[method], run_point, folder / "search" / method, reference, data, split, config.seed)
    return {**result, "selected_settings": result["points"][result["selected"]]["settings"]}


def _shadows(config: CompareConfig, folder: Path, split: ForgetSplit, accelerator: Accelerator) -> list[Classifier]:
    """LiRA's out models: the original's recipe on the retain set (the retrain recipe) with their own seeds."""
    models = []
    for k in range(config.lira_shadows):
        out = folder / "shadows" / f"shadow{k}"
        seed = SHADOW_SEED + 100 * config.seed + k
        settings = config.train_config(out=str(out), seed=seed, resume=True)
        _once(out, settings, lambda s=settings: train(s, accelerator, keep=split.retain_index))
        models.append(load_model(out / MODEL_FILE).to(accelerator.device))
    return models


def _once(out: Path, settings: TrainConfig | UnlearnConfig, work: Callable[[], Any]) -> dict[str, Any]:
    """Run `work` unless `out` already holds a finished run with these `settings` (then reuse its metrics); a
    finished run with other settings is refused, naming them. Where runs write and how they resume is not
    compared, nor another method's settings, which an unlearning run carries but does not use."""
    others = tuple(m for m in METHODS if m != getattr(settings, "method", None))
    manifest = reusable_run(out, to_dict(settings), ignored=(*RUN_PLACEMENT_KEYS, *others))
    return manifest["metrics"] if manifest is not None else work()


def _retrain_metrics(config: CompareConfig, original: str, retrain: str, accelerator: Accelerator) -> dict[str, Any]:
    """Metrics of the gold standard: a given finished retrain run (checked to match), or one trained here."""
    if config.retrain is None:
        settings = config.unlearn_config("retrain", original=original, out=retrain, resume=True)
        return _once(Path(retrain), settings, lambda: unlearn(settings, accelerator))
    manifest = finished_run(retrain, "`classifier unlearn --method retrain`")
    given = manifest["config"]
    if given.get("method") != "retrain" or given.get("forget") != config.forget or given.get("seed") != config.seed:
        raise RunDirError(f"'{retrain}' is not a retrain run for forget '{config.forget}' with seed {config.seed} "
                          f"(it has method {given.get('method')}, forget {given.get('forget')}, "
                          f"seed {given.get('seed')}); "
                          "pass a matching run or leave 'retrain' unset to train one")
    return manifest["metrics"]


def compute_mask_command(config: MaskConfig) -> Mask:
    """Compute and save the saliency mask of a trained classifier for a forget set."""
    out = Path(config.out)
    if out.exists() and not config.overwrite:
        raise RunDirError(f"mask file '{out}' already exists; pass --overwrite to replace it or choose another --out")
    accelerator = make_accelerator()
    train_config, model = _original(config.original)
    data = dataset_for(train_config, accelerator.device)
    split = forget_split(config.forget, data, seed=config.seed)
    mask = _saliency_mask(model.to(accelerator.device), split, data, config.ratio, config.threshold, config.params,
                          config.batch_size, accelerator)
    mask.metadata["forget_spec"] = config.forget
    mask.metadata["source_run"] = str(config.original)
    if accelerator.is_main_process:
        mask.save(out, packed=config.packed)
        print(f"saved mask ({mask.density:.2%} of {mask.metadata['numel']:,} weights) -> {out}")
    return mask
