"""Forget and retain sets of SD erasure: images the base model generates (cached with their prompts and seeds
so a rerun or a resume reuses them), or a user's image folder."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from diffusers import StableDiffusionPipeline

from erasure.io import atomic_open
from erasure.media import list_images, load_rgb, save_png
from erasure.prompts import RECORDS, Prompt, read_prompts
from pipelines.sampling import batches, generate_batch, record, sampling_context

PROMPT_FILE_SUFFIXES = (".txt", ".csv")


@dataclass
class ImageSet:
    """uint8 RGB images (N, H, W, 3) and the prompt of each."""

    images: np.ndarray
    prompts: list[str]

    def __len__(self) -> int:
        return len(self.prompts)


def prompt_texts(items: list[str]) -> list[str]:
    """A list of prompts, or the prompts of the single .txt/.csv file it names."""
    if len(items) == 1 and Path(items[0]).suffix.lower() in PROMPT_FILE_SUFFIXES:
        return [p.text for p in read_prompts(items[0])]
    return list(items)


def plan(texts: list[str], count: int, seed: int, guidance: float) -> list[Prompt]:
    """`count` prompts cycling through `texts`; image i gets seed `seed + i`."""
    return [Prompt(row=i, text=texts[i % len(texts)], seed=seed + i, guidance=guidance) for i in range(count)]


def generate_set(pipe: StableDiffusionPipeline, folder: Path, prompts: list[Prompt], *, resolution: int,
                 steps: int, batch_size: int) -> None:
    """Generate the images of `prompts` into `folder` with prompts.jsonl, keeping images already there
    with the same record (prompt, seed, guidance, steps, scheduler, size)."""
    shape = {"steps": steps, "scheduler": type(pipe.scheduler).__name__, "height": resolution, "width": resolution}
    wanted = [record(p, **shape) for p in prompts]
    existing = _records(folder)
    todo = [p for p, line in zip(prompts, wanted, strict=False)
            if existing.get(p.file) != line or not (folder / p.file).is_file()]
    with sampling_context():
        for batch in batches(todo, batch_size):
            for prompt, image in zip(batch, generate_batch(pipe, batch, height=resolution, width=resolution,
                                                           steps=steps), strict=False):
                save_png(folder / prompt.file, image)
    with atomic_open(folder / RECORDS, "w") as handle:
        handle.writelines(json.dumps(line) + "\n" for line in wanted)


def read_set(folder: str | Path, default_prompts: list[str], resolution: int) -> ImageSet:
    """The images of `folder` (resized to `resolution`) with their prompts from its prompts.jsonl, or
    `default_prompts` cycled over the images when the folder has none."""
    files = list_images(folder)
    records = _records(Path(folder))
    prompts = [records[f.name]["prompt"] if f.name in records else default_prompts[i % len(default_prompts)]
               for i, f in enumerate(files)]
    return ImageSet(np.stack([load_rgb(f, resolution) for f in files]), prompts)


def _records(folder: Path) -> dict[str, dict[str, Any]]:
    """prompts.jsonl of a folder by file name (empty when absent)."""
    path = folder / RECORDS
    if not path.is_file():
        return {}
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {line["file"]: line for line in lines}
