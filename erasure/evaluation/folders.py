"""Where judged images came from: what the image-folder protocols (nudity, FID) record about each folder."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from erasure.io import MANIFEST, read_json
from erasure.prompts import RECORDS, sha256_file

SAMPLING_KEYS = ("model", "run", "prompts", "prompt_file_sha256", "subset", "limit", "steps", "scheduler",
                 "height", "width", "guidance", "seed", "dtype", "device", "images_per_second")


def folder_settings(folder: Path, count: int) -> dict[str, Any]:
    """The folder, its size, and the sample run's settings when it has them."""
    info: dict[str, Any] = {"path": str(folder), "images": count}
    if (folder / RECORDS).is_file():
        info["prompts_jsonl_sha256"] = sha256_file(folder / RECORDS)
    if (folder / MANIFEST).is_file():
        manifest = read_json(folder / MANIFEST)
        sample = {**manifest.get("config", {}), **(manifest.get("metrics") or {})}
        info["sampling"] = {k: sample[k] for k in SAMPLING_KEYS if k in sample}
    return info
