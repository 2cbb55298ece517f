"""The step every unlearning loop shares: finite-loss guard, backward, mask, clip, optimizer step.

Domains differ in what their loss is and how batches are drawn; what happens between a loss and
the next weights is the same everywhere, so it lives here once.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from erasure.errors import NonFiniteLossError

if TYPE_CHECKING:
    from erasure.io import RunDir
    from erasure.saliency import Mask


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Run a block with `model` in eval mode (batch-norm statistics fixed, no dropout), restoring its mode after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def ensure_finite(loss: Tensor, *, what: str, step: int, run: RunDir, last_checkpoint: int | None) -> None:
    """Stop a run whose loss became NaN or infinite, marking it failed; its last checkpoint stays."""
    if torch.isfinite(loss):
        return
    where = (f"the last good checkpoint (step {last_checkpoint}) is kept in {run.checkpoints}"
             if last_checkpoint is not None else "no checkpoint was written yet")
    message = (f"the {what} loss became {loss.item()} at step {step}; {where}. "
               "Lower the learning rate (--lr) and rerun with --resume or --overwrite")
    run.fail(message)
    raise NonFiniteLossError(message)


def restore_checkpoint(run: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
    """Load a resumed run's last checkpoint into `model` and `optimizer`; the whole state, or None to start fresh."""
    from erasure.io import load_checkpoint

    state = load_checkpoint(run.checkpoints) if run.resumed else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    return state


def masked_step(loss: Tensor, *, accelerator: Any, model: nn.Module, optimizer: torch.optim.Optimizer,
                mask: Mask | None = None, grad_clip: float = 0.0, clip_before_mask: bool = False) -> None:
    """backward -> (on the last micro-step) zero unmasked gradients -> clip the global norm -> step -> zero_grad.

    Call it inside `accelerator.accumulate(model)` for gradient accumulation: gradients add up over the
    micro-steps and mask, clip and step act once, when `accelerator.sync_gradients`. The mask is applied
    before clipping so the norm sees only the gradient that will be used; `clip_before_mask` clips the whole
    gradient first and masks after (the SalUn DDPM reference's order). `mask.protect_unmasked` (registered once on
    the optimizer) keeps unmasked weights bit-identical either way.
    """
    accelerator.backward(loss)
    if not accelerator.sync_gradients:
        return
    if grad_clip and clip_before_mask:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    if mask is not None:
        mask.apply_to_grads(accelerator.unwrap_model(model, keep_torch_compile=False))
    if grad_clip and not clip_before_mask:
        accelerator.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
