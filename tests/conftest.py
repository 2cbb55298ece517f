"""Shared fixtures: offline hub, GPU tests skipped without CUDA, a tiny Stable Diffusion pipeline, a CLI runner."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models on a 2-core machine: one intra-op thread is faster and far steadier under load
# (set before torch is imported; CLI subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests cleanly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD pipeline saved once per session in diffusers format."""
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture
def run_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """Run `erasure <args>` in-process; returns (exit status, stdout + stderr)."""
    from erasure.cli import main

    def run(*args: object) -> tuple[int, str]:
        capsys.readouterr()
        status = main([str(a) for a in args])
        captured = capsys.readouterr()
        return status, captured.out + captured.err

    return run


@pytest.fixture(scope="session")
def cifar_judge(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A barely trained 32x32 CIFAR-10 CNN (width 4), trained once per session: enough to exercise a protocol
    that judges or featurises images with a classifier run."""
    from classifiers.commands import train
    from classifiers.config import TrainConfig
    from erasure.config import from_dict

    out = tmp_path_factory.mktemp("judge") / "cnn"
    train(from_dict(TrainConfig, {"dataset": "cifar10", "arch": "cnn", "width": 4, "epochs": 1, "train_limit": 128,
                                  "out": str(out)}))
    return out


@pytest.fixture(scope="session")
def digits_original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small MLP trained once per session on scikit-learn's digits (the classifier tests' original model)."""
    from helpers.digits import train_config

    from classifiers.commands import train

    out = tmp_path_factory.mktemp("digits") / "original"
    assert train(train_config(out))["test_acc"] > 90
    return out
