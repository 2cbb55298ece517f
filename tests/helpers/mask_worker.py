"""Worker for tests/test_saliency_multiprocess.py: computes a saliency mask under `accelerate launch`.

Usage: accelerate launch --num_processes 2 ... mask_worker.py OUT_DIR
Each rank writes OUT_DIR/rank{r}.safetensors (its mask) and OUT_DIR/rank{r}.json (what it saw).
The model, data and loss are importable so the test can compute the one-process mask itself.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RATIO = 0.3


def build_model() -> nn.Module:
    """A seeded conv + MLP classifier small enough for CPU tests."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 10), nn.Tanh(), nn.Linear(10, 4)
    )


def build_batches() -> list[tuple[Tensor, Tensor]]:
    """Six seeded (images, labels) batches of 6x6 single-channel images."""
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(5, 1, 6, 6, generator=generator), torch.randint(0, 4, (5,), generator=generator))
        for _ in range(6)
    ]


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of the model on one batch."""
    images, labels = batch
    return F.cross_entropy(model(images), labels)


def main(out_dir: Path) -> None:
    """Compute the mask with a multi-process Accelerator and write this rank's results."""
    from accelerate import Accelerator

    from erasure.saliency import compute_mask

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare_model(build_model())
    mask = compute_mask(model, build_batches(), loss_fn, ratio=RATIO, accelerator=accelerator, progress=False)
    rank = accelerator.process_index
    mask.save(out_dir / f"rank{rank}.safetensors")
    seen = {"num_processes": accelerator.num_processes, "process_index": rank, "wrapped": hasattr(model, "module")}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
