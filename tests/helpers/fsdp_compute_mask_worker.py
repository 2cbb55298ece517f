"""Worker for tests/test_saliency_sharded.py: `compute_mask` on a model sharded by FSDP2 over two CPU ranks.

Usage: accelerate launch --num_processes 2 ... fsdp_compute_mask_worker.py OUT_DIR
Every rank shards the same seeded model with `fully_shard` (each parameter split by rows, 7 rows as 4 + 3) and
computes every case's mask from the same forget batches; rank 0 also computes each case on an unsharded copy
and writes OUT_DIR/result.pt with both and the refusal of a partly sharded model. Input column 0 is always
zero and one layer is never used, so many gradients are exactly zero: the cut of a high ratio falls among ties
that lie on both ranks.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

CASES = {
    "ratio 0.3": {"ratio": 0.3},
    "ratio 0.9 (cut among zero ties)": {"ratio": 0.9},
    "threshold": {"threshold": 0.05},
    "soft": {"ratio": 0.4, "soft_temperature": 0.2},
    "clipped": {"ratio": 0.5, "grad_clip": 0.05},
}


class Model(nn.Module):
    """6 -> 7 -> 3, plus a layer the forward never uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second, self.unused = nn.Linear(6, 7), nn.Linear(7, 3), nn.Linear(5, 9)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.relu(self.first(x)))


def batches() -> list[tuple[Tensor, Tensor]]:
    """Five seeded forget batches of 4; input column 0 is zero."""
    generator = torch.Generator().manual_seed(1)
    out = []
    for _ in range(5):
        x = torch.randn(4, 6, generator=generator)
        x[:, 0] = 0
        out.append((x, torch.randint(0, 3, (4,), generator=generator)))
    return out


def loss_fn(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def masks_of(model: nn.Module) -> dict[str, tuple[dict[str, Tensor], dict]]:
    """Every case's mask tensors and metadata."""
    from erasure.saliency import compute_mask

    results = {}
    for name, case in CASES.items():
        mask = compute_mask(model, batches(), loss_fn, progress=False, **case)
        results[name] = (mask.masks, mask.metadata)
    return results


def refusal() -> str:
    """The error of a mask pass over a model whose first layer alone is sharded."""
    from torch.distributed.fsdp import fully_shard

    from erasure.errors import MaskError
    from erasure.saliency import compute_mask

    partly = Model()
    fully_shard(partly.first)
    try:
        compute_mask(partly, batches(), loss_fn, ratio=0.5, progress=False)
    except MaskError as error:
        return str(error)
    return "no error"


def main(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    sharded = Model()
    for layer in (sharded.first, sharded.second, sharded.unused):
        fully_shard(layer)
    fully_shard(sharded)
    types = sorted({type(p).__name__ for p in sharded.parameters()})
    results = masks_of(sharded)
    grads_left = [p.grad for p in sharded.parameters() if p.grad is not None]
    if dist.get_rank() == 0:
        torch.save({"world": dist.get_world_size(), "types": types, "grads_left": len(grads_left),
                    "sharded": results, "single": masks_of(Model()), "partly sharded": refusal()},
                   out_dir / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
