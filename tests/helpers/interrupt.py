"""A simulated interruption of `erasure sd`, for the resume tests (in-process, and in launched processes)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any


def crashing_at(step_loss: Callable[..., Any], crash_step: int) -> Callable[..., Any]:
    """`Eraser.step_loss` that raises at `crash_step` and otherwise calls `step_loss`."""

    def crashing(self, step, micro=0):
        if step == crash_step:
            raise RuntimeError("simulated crash")
        return step_loss(self, step, micro)

    return crashing
