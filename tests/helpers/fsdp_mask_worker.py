"""Worker for tests/test_saliency_sharded.py: masked AdamW steps on an MLP sharded by FSDP2 over two CPU ranks.

Usage: accelerate launch --num_processes 2 ... fsdp_mask_worker.py OUT_DIR
Every rank shards the same seeded MLP with `fully_shard` (parameters become DTensors, each rank holding a row
block; 7 rows split 4 + 3, so one shard is padded), trains it on the same batch under the same mask (one
parameter left out of the mask, so wholly frozen) and gathers the result; rank 0 also trains an unsharded copy
and writes OUT_DIR/result.pt with both, the starting weights and the mask.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor, nn

STEPS = 3


def build() -> nn.Sequential:
    """The seeded MLP: 6 -> 7 -> 3."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 3))


def mask_tensors(model: nn.Module) -> dict[str, Tensor]:
    """A seeded 40 % mask over every parameter but the last bias."""
    generator = torch.Generator().manual_seed(1)
    return {name: torch.rand(p.shape, generator=generator) < 0.4
            for name, p in model.named_parameters() if name != "2.bias"}


def train(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """STEPS masked AdamW steps (weight decay on, so unmasked weights would move without protection)."""
    from erasure.saliency import Mask

    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(8, 6, generator=generator), torch.randn(8, 3, generator=generator)
    mask = Mask(masks, {})
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    mask.protect_unmasked(model, optimizer)
    for _ in range(STEPS):
        (model(x) - y).square().mean().backward()
        mask.apply_to_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main(out_dir: Path) -> None:
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    masks = mask_tensors(build())
    sharded = build()
    for layer in (sharded[0], sharded[2]):
        fully_shard(layer)
    fully_shard(sharded)
    sharded_types = {type(p).__name__ for p in sharded.parameters()}
    train(sharded, masks)
    gathered = {name: p.full_tensor().detach().clone() for name, p in sharded.named_parameters()}
    if dist.get_rank() == 0:
        single = build()
        train(single, masks)
        torch.save({"world": dist.get_world_size(), "types": sorted(sharded_types), "sharded": gathered,
                    "single": {k: v.detach() for k, v in single.state_dict().items()},
                    "base": build().state_dict(), "masks": masks}, out_dir / "result.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
