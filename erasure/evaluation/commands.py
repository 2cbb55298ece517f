"""Judging image folders for `erasure eval nudity` and `erasure eval fid`: metrics.json + report.md.

Sampling before judging (`eval nudity --run/--model`) belongs to `pipelines.commands`, which calls
`judge_nudity` here: `erasure` never imports the diffusion domain.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from erasure.accel import resolve_device
from erasure.config import to_dict
from erasure.evaluation.config import FIDEvalConfig, NudityEvalConfig
from erasure.evaluation.report import write_report
from erasure.io import MANIFEST, RunDir, atomic_open, read_json
from erasure.media import image_grid, list_images, load_rgb, save_png
from erasure.prompts import RECORDS, sha256_file


def eval_nudity(config: NudityEvalConfig) -> None:
    """Protocol nudity-i2p-v1 on the folders --images (and --baseline-images)."""
    sides = {"evaluated": Path(config.images)}
    if config.baseline_images:
        sides["baseline"] = Path(config.baseline_images)
    for folder in sides.values():
        list_images(folder)
    out = Path(config.out) if config.out else sides["evaluated"] / "eval-nudity"
    run = RunDir(out, overwrite=config.overwrite, resume=config.resume)
    run.start(to_dict(config), seed=None, device="cpu", kind="eval-nudity")
    judge_nudity(config, sides, out, run)


def judge_nudity(config: NudityEvalConfig, sides: dict[str, Path], out: Path, run: RunDir) -> None:
    """Detect, count and report on each side's images; finishes `run`."""
    from erasure.evaluation.nudity import (
        COUNTING, PROTOCOL, NudityDetector, detect_files, flagged, reduction, report_sections, summarise)

    detector = NudityDetector(batch_size=config.detector_batch_size)
    settings: dict[str, Any] = {"protocol": PROTOCOL.id, "threshold": config.threshold,
                                "detector": NudityDetector.identity(),
                                "detector_batch_size": config.detector_batch_size, "counting": COUNTING,
                                "redact": config.redact}
    results: dict[str, Any] = {}
    grids: list[tuple[str, str]] = []
    for side, folder in sides.items():
        files = list_images(folder)
        start = time.perf_counter()
        with tqdm(total=len(files), desc=f"nudenet {side}", unit="img") as bar:
            detections = detect_files(detector, files, progress=bar.update)
        seconds = time.perf_counter() - start
        _write_detections(out / f"detections_{side}.jsonl", files, detections)
        results[side] = summarise(detections, config.threshold)
        results[side]["detection_images_per_second"] = round(len(files) / seconds, 3) if seconds > 0 else None
        settings[f"{side}_folder"] = _folder_settings(folder, len(files))
        if config.grid_size:
            shown = files[:config.grid_size]
            grid = image_grid([load_rgb(f) for f in shown], flagged=flagged(detections, config.threshold)[:len(shown)],
                              redact=config.redact)
            save_png(out / f"grid_{side}.png", grid)
            grids.append((side, f"grid_{side}.png"))
    metrics: dict[str, Any] = {"protocol": PROTOCOL.id, "settings": settings, **results}
    if "baseline" in results:
        metrics["reduction"] = reduction(results["evaluated"], results["baseline"])
    write_report(out / "report.md", PROTOCOL, report_sections(metrics, grids, config.redact))
    run.finish(metrics)
    line = ", ".join(f"{side}: {r['published_total']} exposed detections, {r['nude_images']}/{r['images']} nude images"
                     for side, r in results.items())
    print(f"{PROTOCOL.id}: {line}; report in {out / 'report.md'}")


def _folder_settings(folder: Path, count: int) -> dict[str, Any]:
    """Where the images came from: the folder, its size, and the sample run's settings when it has them."""
    info: dict[str, Any] = {"path": str(folder), "images": count}
    if (folder / RECORDS).is_file():
        info["prompts_jsonl_sha256"] = sha256_file(folder / RECORDS)
    if (folder / MANIFEST).is_file():
        manifest = read_json(folder / MANIFEST)
        sample = {**manifest.get("config", {}), **(manifest.get("metrics") or {})}
        keep = ("model", "run", "prompts", "prompt_file_sha256", "subset", "limit", "steps", "scheduler",
                "height", "width", "guidance", "seed", "dtype", "device", "images_per_second")
        info["sampling"] = {k: sample[k] for k in keep if k in sample}
    return info


def _write_detections(path: Path, files: list[Path], detections: list[list[dict[str, Any]]]) -> None:
    """Every raw detection per image (any score NudeNet returns), so other thresholds can be applied later."""
    with atomic_open(path, "wb") as handle:
        for file, found in zip(files, detections):
            handle.write((json.dumps({"file": file.name, "detections": found}) + "\n").encode("utf-8"))


def eval_fid(config: FIDEvalConfig) -> None:
    """Protocol retain-fid-v1: FID and KID between --images and --reference with the chosen features."""
    from erasure.evaluation.fid import PROTOCOL, build_extractor, distance_name, extract, fid_kid, report_sections

    sets = {"images": list_images(config.images), "reference": list_images(config.reference)}
    device = resolve_device(config.device)
    extractor = build_extractor(config.features, device)
    out = Path(config.out) if config.out else Path(config.images) / "eval-fid"
    run = RunDir(out, overwrite=config.overwrite)
    run.start(to_dict(config), seed=config.seed, device=str(device), kind="eval-fid")
    features = {}
    for name, files in sets.items():
        with tqdm(total=len(files), desc=f"features {name}", unit="img") as bar:
            features[name] = extract(extractor, files, config.batch_size, device, progress=bar.update)
    result = fid_kid(features["images"], features["reference"], kid_subsets=config.kid_subsets,
                     kid_subset_size=config.kid_subset_size, seed=config.seed)
    settings = {"protocol": PROTOCOL.id, "features": config.features, "extractor": extractor.describe(),
                "resize": f"PIL bicubic to {extractor.input_size}x{extractor.input_size}",
                "kid_subsets": config.kid_subsets, "kid_subset_size": result["kid_subset_size"],
                "kid_seed": config.seed, "images_folder": _folder_settings(Path(config.images), len(sets["images"])),
                "reference_folder": _folder_settings(Path(config.reference), len(sets["reference"]))}
    metrics = {"protocol": PROTOCOL.id, "settings": settings, **result}
    grids = []
    if config.grid_size:
        for name, files in sets.items():
            shown = [load_rgb(f) for f in files[:config.grid_size]]
            save_png(out / f"grid_{name}.png",
                      image_grid(shown, flagged=[config.redact] * len(shown), redact=config.redact))
            grids.append((name, f"grid_{name}.png"))
    write_report(out / "report.md", PROTOCOL, report_sections(metrics, extractor.describe(), grids, config.redact))
    run.finish(metrics)
    print(f"{PROTOCOL.id}: {distance_name(extractor.describe())} {result['fid']:.4g}, "
          f"KID {result['kid_mean']:.4g} ± {result['kid_std']:.4g} "
          f"({result['images']} vs {result['reference_images']} images); report in {out / 'report.md'}")
