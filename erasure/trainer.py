"""One training loop for every domain: masked step, learning-rate schedule, checkpoints, resume, progress, trackers.

A domain hands the `Trainer` its model, an optimizer and `loss_at(model, step)` (with gradient accumulation
`loss_at(model, step, micro)`, once per micro-step); the Trainer owns everything between a loss and the next
weights (erasure.training.masked_step under `accelerator.accumulate`), the learning rate as a pure function
of the step, checkpoints through `accelerator.save_state` in `run.checkpoints` (an EMA is registered for
checkpointing), exact resume from the last checkpoint, the finite-loss guard, a tqdm bar and Accelerate trackers.
"""
from __future__ import annotations

import importlib.util
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from erasure.errors import ConfigError
from erasure.training import ensure_finite, masked_step

if TYPE_CHECKING:
    from erasure.io import RunDir
    from erasure.saliency import Mask

LossAt = Callable[[nn.Module, int], Tensor] | Callable[[nn.Module, int, int], Tensor]
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}
STEP_PREFIX = "step-"


def tracker_options(log_with: str | None, project_dir: str | Path) -> dict[str, Any]:
    """Accelerator keyword arguments for `log_with` (None: no tracker); a one-line error when it cannot work."""
    if log_with is None:
        return {}
    if log_with not in TRACKERS:
        raise ConfigError(f"log_with: unknown tracker {log_with!r}; choose one of {sorted(TRACKERS)} or leave it off")
    if importlib.util.find_spec(TRACKERS[log_with]) is None:
        raise ConfigError(f"log_with: {log_with} is not installed; pip install {TRACKERS[log_with]} "
                          "or leave log_with off")
    return {"log_with": log_with, "project_dir": str(project_dir)}


class EMA:
    """Exponential moving average of a model's weights (with the usual (1 + s) / (10 + s) warm-up)."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Move the average towards the model's weights after optimizer step `step` (0-based)."""
        decay = min(self.decay, (1 + step) / (10 + step))
        for name, value in model.state_dict().items():
            self.shadow[name].lerp_(value.float(), 1.0 - decay)

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into `model`."""
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


def last_checkpoint_dir(folder: Path) -> tuple[int, Path] | None:
    """(step, directory) of the newest `step-N` checkpoint under `folder`, or None."""
    found = _checkpoint_dirs(folder)
    return max(found) if found else None


class Trainer:
    """Runs `loss_at(model, step)` for steps [start, steps) with one optimizer, resuming from `run.checkpoints`.

    `lr_at(step)` sets every group's learning rate before each step. `samples_per_step` feeds the
    throughput shown and logged. With `accumulation` > 1 each optimizer step runs that many micro-steps
    `loss_at(model, step, micro)` under `accelerator.accumulate` (the accelerator must be built with the same
    `gradient_accumulation_steps`); gradients add up and mask, clip and step act once, on the last.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, accelerator: Any, run: RunDir,
                 steps: int, lr_at: Callable[[int], float], mask: Mask | None = None, grad_clip: float = 0.0,
                 checkpoint_every: int = 0, ema: EMA | None = None, samples_per_step: int = 0,
                 name: str = "train", tracker_config: dict[str, Any] | None = None, clip_before_mask: bool = False,
                 accumulation: int = 1):
        if accumulation != accelerator.gradient_accumulation_steps:
            raise ConfigError(f"accumulation {accumulation} differs from the accelerator's "
                              f"gradient_accumulation_steps {accelerator.gradient_accumulation_steps}; "
                              "build both from the same setting")
        self.accumulation = accumulation
        self.accelerator, self.run, self.steps, self.lr_at = accelerator, run, steps, lr_at
        self.clip_before_mask = clip_before_mask
        self.mask, self.grad_clip, self.checkpoint_every, self.ema = mask, grad_clip, checkpoint_every, ema
        self.samples_per_step, self.name = samples_per_step, name
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        if mask is not None:
            mask.protect_unmasked(self.unwrapped, getattr(self.optimizer, "optimizer", self.optimizer))
        if ema is not None:
            accelerator.register_for_checkpointing(ema)
        if accelerator.log_with:
            accelerator.init_trackers(name, config=tracker_config or {})
        self.last_checkpoint: int | None = None

    @property
    def unwrapped(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)

    def resume(self) -> int:
        """Load the last checkpoint of a resumed run (model, optimizer, EMA, RNG states); the step to start at."""
        found = last_checkpoint_dir(self.run.checkpoints) if self.run.resumed else None
        if found is None:
            return 0
        step, folder = found
        self.accelerator.load_state(str(folder))
        self.last_checkpoint = step
        return step

    def checkpoint(self, step: int) -> None:
        """Save the whole training state after `step` steps; older checkpoints are removed once it is written."""
        self.accelerator.wait_for_everyone()
        folder = self.run.checkpoints / f"{STEP_PREFIX}{step}"
        self.accelerator.save_state(str(folder))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            for _, old in [c for c in _checkpoint_dirs(self.run.checkpoints) if c[1] != folder]:
                shutil.rmtree(old)
        self.last_checkpoint = step

    def fit(self, loss_at: LossAt, stop_after: Callable[[int], bool] | None = None) -> dict[str, Any]:
        """Train to `steps` (from the last checkpoint when resuming); returns steps, timing and the last loss.

        `stop_after(step)`, asked after each optimizer step, ends the run early when it returns True
        (e.g. the classifier's `stop_when`); it must depend on the weights only, so resume stays exact.
        """
        start = self.resume()
        self.model.train()
        t0 = time.perf_counter()
        loss, done = float("nan"), start
        bar = tqdm(range(start, self.steps), desc=self.name, initial=start, total=self.steps,
                   disable=None if self.accelerator.is_main_process else True, leave=False)
        for step in bar:
            loss = self._step(loss_at, step)
            done = step + 1
            rate = (done - start) / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss:.4f}", **self._speed(rate))
            self._log(step, loss, rate)
            if stop_after is not None and stop_after(step):
                break
            if self.checkpoint_every and done % self.checkpoint_every == 0 and done < self.steps:
                self.checkpoint(done)
        bar.close()
        seconds = time.perf_counter() - t0
        return {"steps": done, "resumed_from_step": start, "train_seconds": round(seconds, 3),
                "steps_per_second": round((done - start) / seconds, 3) if seconds > 0 else None, "final_loss": loss}

    def _step(self, loss_at: LossAt, step: int) -> float:
        """One optimizer step (all its micro-steps); the mean of the micro-steps' losses."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        losses = [self._micro_step(loss_at, step, micro) for micro in range(self.accumulation)]
        if self.ema is not None:
            self.ema.update(self.unwrapped, step)
        return sum(losses) / len(losses)

    def _micro_step(self, loss_at: LossAt, step: int, micro: int) -> float:
        """backward of one micro-step's loss; the masked optimizer step runs on the last micro-step."""
        with self.accelerator.accumulate(self.model), self.accelerator.autocast():
            loss = loss_at(self.model, step) if self.accumulation == 1 else loss_at(self.model, step, micro)
            ensure_finite(loss, what=self.name, step=step, run=self.run, last_checkpoint=self.last_checkpoint)
            masked_step(loss, accelerator=self.accelerator, model=self.model, optimizer=self.optimizer,
                        mask=self.mask, grad_clip=self.grad_clip, clip_before_mask=self.clip_before_mask)
        return loss.item()

    def _speed(self, steps_per_second: float) -> dict[str, str]:
        if self.samples_per_step:
            return {"samples/s": f"{steps_per_second * self.samples_per_step:.1f}"}
        return {"steps/s": f"{steps_per_second:.2f}"}

    def _log(self, step: int, loss: float, steps_per_second: float) -> None:
        if not self.accelerator.log_with:
            return
        values = {"loss": loss, "lr": self.lr_at(step), "steps_per_second": steps_per_second}
        if self.samples_per_step:
            values["samples_per_second"] = steps_per_second * self.samples_per_step
        if self.mask is not None:
            values["mask_density"] = self.mask.density
        self.accelerator.log(values, step=step)


def _checkpoint_dirs(folder: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `step-N` checkpoint under `folder`."""
    return [(int(p.name[len(STEP_PREFIX):]), p) for p in folder.glob(f"{STEP_PREFIX}*")
            if p.is_dir() and p.name[len(STEP_PREFIX):].isdigit()] if folder.is_dir() else []
