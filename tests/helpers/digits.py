"""Configs of the small digits runs that the classifier tests share."""
from __future__ import annotations

from pathlib import Path

from classifiers.config import TrainConfig, UnlearnConfig
from erasure.config import from_dict


def train_config(out: Path, **extra) -> TrainConfig:
    """A small MLP on scikit-learn's digits (about a second on a CPU)."""
    return from_dict(TrainConfig, {"out": str(out), "dataset": "digits", "arch": "mlp", "width": 64, "epochs": 12,
                                   "batch_size": 64, "lr": 0.05, "checkpoint_every": 0, **extra})


def unlearn_config(original: Path, out: Path, method: str, **extra) -> UnlearnConfig:
    """Forget the digit 3 from `original` with `method`."""
    return from_dict(UnlearnConfig, {"original": str(original), "out": str(out), "method": method,
                                     "forget": "class:3", "epochs": 5, "lr": 0.05, "schedule": "constant",
                                     "checkpoint_every": 0, **extra})
