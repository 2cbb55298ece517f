"""Real forget and retain sets for `erasure bench erase --images real`: CIFAR-10 training images at the testbed's
16 px, each captioned with its class's quality prompt, written as image folders that `erasure sd` reads
(--forget-images / --retain-images). SalUn's class-wise reference trains on the dataset's own images this way
(Unlearn-Saliency SD/train-scripts/random_label.py: forget = the class's images, remain = the others', each with its
class description), instead of on the base model's generations.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from erasure.datasets import ImageSet, load_cifar10
from erasure.io import atomic_dir
from erasure.media import save_png
from erasure.prompts import RECORDS
from pipelines.testbed_captions import CLASSES, QUALITY_PROMPT, caption
from pipelines.testbed_models import RESOLUTION


def balanced(data: ImageSet, labels: list[int], count: int) -> torch.Tensor:
    """Indices of `count` images taken in turn from each class of `labels`, each class's in dataset order."""
    pools = [torch.nonzero(data.labels == label).flatten().tolist() for label in labels]
    if count > sum(len(pool) for pool in pools):
        raise ValueError(f"only {sum(len(pool) for pool in pools)} images of classes {labels}; asked for {count}")
    picked, depth = [], 0
    while len(picked) < count:
        picked += [pool[depth] for pool in pools if depth < len(pool)][:count - len(picked)]
        depth += 1
    return torch.tensor(picked)


def write_folder(folder: Path, data: ImageSet) -> None:
    """Images as PNGs with a prompts.jsonl naming each one's quality prompt."""
    with atomic_dir(folder) as tmp:
        lines = []
        for i, (image, label) in enumerate(zip(data.images, data.labels.tolist(), strict=True)):
            name = f"{i:05d}.png"
            save_png(tmp / name, image.permute(1, 2, 0).numpy())
            lines.append(json.dumps({"file": name, "prompt": caption(QUALITY_PROMPT, CLASSES[label])}))
        (tmp / RECORDS).write_text("\n".join(lines) + "\n")


def real_sets(classes: list[str], count: int, folder: Path, data_dir: str | None = None) -> dict[str, str]:
    """`forget_images` (the erased classes') and `retain_images` (the other classes') folders under `folder`,
    `count` images each, balanced over their classes (kept when already written: CIFAR-10 is then not read)."""
    folders = {"forget_images": folder / "forget", "retain_images": folder / "retain"}
    if not all((path / RECORDS).is_file() for path in folders.values()):
        data = load_cifar10(data_dir, resolution=RESOLUTION).train
        erased = [CLASSES.index(name) for name in classes]
        kept = [label for label in range(len(CLASSES)) if label not in erased]
        for path, labels in zip(folders.values(), (erased, kept), strict=True):
            write_folder(path, data.subset(balanced(data, labels, count)))
    return {key: str(path) for key, path in folders.items()}
