"""Worker for tests/test_saliency_sharded.py: each rank selects a mask from its shard of the scores.

Usage: accelerate launch --num_processes 2 ... sharded_select_worker.py OUT_DIR
The global scores are one flat vector full of ties (as FSDP flattens parameters); rank r holds the r-th
consecutive piece, itself split into two tensors. Each rank writes OUT_DIR/rank{r}.pt: its masks per case.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor

CASES = {"ratio 0.3": {"ratio": 0.3}, "ratio 0.5": {"ratio": 0.5}, "threshold": {"threshold": 3.0}}
TEMPERATURE = 0.1
SPLIT = 1237  # rank 0 holds entries [0, SPLIT), rank 1 the rest: unequal pieces


def global_scores() -> Tensor:
    """3,001 seeded scores with many exact ties (multiples of 1/7, zeros included)."""
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 40, (3001,), generator=generator).float() / 7


def shard(rank: int) -> dict[str, Tensor]:
    """Rank `rank`'s consecutive piece of the global scores, as two named tensors."""
    scores = global_scores()
    piece = scores[:SPLIT] if rank == 0 else scores[SPLIT:]
    half = piece.numel() // 3
    return {"a": piece[:half].clone(), "b": piece[half:].clone()}


def main(out_dir: Path) -> None:
    """Select every case from this rank's shard with sharded=True and save the masks."""
    from accelerate import Accelerator

    from erasure.saliency import select_mask, soft_mask

    accelerator = Accelerator(cpu=True)
    scores = shard(accelerator.process_index)
    results: dict[str, object] = {"world": accelerator.num_processes}
    for name, selection in CASES.items():
        results[name] = select_mask(scores, sharded=True, **selection)
    results["soft"] = soft_mask(scores, temperature=TEMPERATURE, ratio=0.3, sharded=True)
    torch.save(results, out_dir / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
