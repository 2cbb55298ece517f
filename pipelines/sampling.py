"""Batched, resumable image generation: one PNG per prompt plus a `prompts.jsonl` record.

Prompts are batched per guidance value (one forward pass has one guidance scale). Each image gets its
own CPU `torch.Generator` seeded with its prompt's seed, so an image does not depend on which batch it
landed in, on the batch size or on the device. Outputs are `output_type="np"` floats in [0, 1],
converted to uint8 with the range stated explicitly.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from tqdm.auto import tqdm

from erasure.accel import resolve_device, resolve_dtype
from erasure.config import to_dict
from erasure.io import RunDir, atomic_open, check_resumable
from erasure.media import UNIT, save_png, to_uint8
from erasure.prompts import RECORDS, Prompt, read_prompts, sha256_file
from pipelines.config import SampleConfig
from pipelines.loading import check_scheduler, erased_unet_dir, load_base_pipeline, load_erased_pipeline, set_scheduler

# Settings that may change when a sample directory is resumed; any other change is refused.
RESUMABLE_KEYS = ("resume", "overwrite", "batch_size", "limit", "device")


def batches(prompts: Sequence[Prompt], batch_size: int) -> Iterator[list[Prompt]]:
    """Batches of prompts that share a guidance scale, in order of (guidance, row)."""
    ordered = sorted(prompts, key=lambda p: (p.guidance, p.row))
    for _, group in itertools.groupby(ordered, key=lambda p: p.guidance):
        group = list(group)
        for start in range(0, len(group), batch_size):
            yield group[start:start + batch_size]


def generate_batch(pipe: StableDiffusionPipeline, batch: Sequence[Prompt], *, height: int, width: int,
                   steps: int) -> list[Any]:
    """uint8 RGB HWC images for prompts sharing one guidance scale."""
    guidance = {p.guidance for p in batch}
    if len(guidance) != 1:
        raise ValueError(f"a batch must share one guidance scale, got {sorted(guidance)}")
    generators = [torch.Generator("cpu").manual_seed(p.seed) for p in batch]
    with torch.inference_mode():
        result = pipe(prompt=[p.text for p in batch], height=height, width=width, num_inference_steps=steps,
                      guidance_scale=guidance.pop(), generator=generators, output_type="np")
    return list(to_uint8(result.images, UNIT))


def record(prompt: Prompt, *, steps: int, scheduler: str, height: int, width: int) -> dict[str, Any]:
    """The prompts.jsonl line of one image."""
    return {"file": prompt.file, "row": prompt.row, "prompt": prompt.text, "seed": prompt.seed,
            "guidance": prompt.guidance, "steps": steps, "scheduler": scheduler, "height": height,
            "width": width, "categories": list(prompt.categories)}


def check_inputs(config: SampleConfig) -> list[Prompt]:
    """The prompts of `config`, after checking the prompt file and the erased run (before any output exists)."""
    prompts = read_prompts(config.prompts, subset=config.subset, limit=config.limit, seed=config.seed,
                           guidance=config.guidance)
    if config.run:
        erased_unet_dir(config.run)
    check_scheduler(config.model, config.scheduler)
    return prompts


def run_sampling(config: SampleConfig, *, progress: bool = True) -> dict[str, Any]:
    """Generate the images of `config` into `config.out`; returns the metrics written to metrics.json."""
    prompts = check_inputs(config)
    out = Path(config.out)
    run = RunDir(out, overwrite=config.overwrite, resume=config.resume)
    settings = to_dict(config)
    settings.update(prompt_file_sha256=sha256_file(config.prompts),
                    noise="per-image CPU torch.Generator seeded with the prompt's seed")
    if run.resumed:
        check_resumable(out, settings, RESUMABLE_KEYS)
    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    run.start(settings, seed=config.seed, device=str(device), kind="sample")
    todo = [p for p in prompts if not (out / p.file).is_file()]
    todo_files = {p.file for p in todo}
    pipe = (load_erased_pipeline(config.model, config.run, device, dtype) if config.run
            else load_base_pipeline(config.model, device, dtype))
    scheduler = set_scheduler(pipe, config.scheduler)
    shape = {"steps": config.steps, "scheduler": scheduler, "height": config.height, "width": config.width}
    _rewrite_records(out, [record(p, **shape) for p in prompts if p.file not in todo_files])
    start = time.perf_counter()
    with tqdm(total=len(todo), desc="sample", unit="img", disable=not progress) as bar, \
            open(out / RECORDS, "a", encoding="ascii") as records, sampling_context():
        for batch in batches(todo, config.batch_size):
            images = generate_batch(pipe, batch, height=config.height, width=config.width, steps=config.steps)
            for prompt, image in zip(batch, images, strict=False):
                save_png(out / prompt.file, image)
                records.write(json.dumps(record(prompt, **shape)) + "\n")
                records.flush()
            bar.update(len(batch))
    seconds = time.perf_counter() - start
    _rewrite_records(out, [record(p, **shape) for p in prompts])
    metrics = {"images": len(prompts), "generated": len(todo), "skipped_existing": len(prompts) - len(todo),
               "generation_seconds": round(seconds, 3),
               "images_per_second": round(len(todo) / seconds, 4) if todo and seconds > 0 else None,
               "scheduler": scheduler, "dtype": str(dtype).removeprefix("torch."), "device": str(device)}
    run.finish(metrics)
    return metrics


@contextlib.contextmanager
def sampling_context() -> Iterator[None]:
    """Silence the per-prompt 'truncated to 77 tokens' warnings while sampling (CLIP keeps the first 77
    tokens, as in published evaluations); the logging levels are restored on exit."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    levels = diffusers_logging.get_verbosity(), transformers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(levels[0])
        transformers_logging.set_verbosity(levels[1])


def _rewrite_records(out: Path, done: list[dict[str, Any]]) -> None:
    """prompts.jsonl with one line per image, in row order (so equal runs give equal files)."""
    with atomic_open(out / RECORDS, "w") as handle:
        for line in sorted(done, key=lambda r: r["row"]):
            handle.write(json.dumps(line) + "\n")
