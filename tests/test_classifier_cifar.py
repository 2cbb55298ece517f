"""A real CIFAR-10 slice from the shared data (slow: decodes the JPEGs once, trains a small CNN)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from classifiers.commands import train, unlearn
from classifiers.config import TrainConfig, UnlearnConfig
from classifiers.data import augment
from erasure.config import from_dict
from erasure.datasets import load_cifar10

DATA = Path(os.environ.get("ERASURE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
needs_data = pytest.mark.skipif(not (DATA / "cifar10_jpeg.npz").is_file(), reason="shared CIFAR-10 not found")


@pytest.mark.slow
@needs_data
def test_cifar10_splits_follow_salun():
    data = load_cifar10(str(DATA))
    assert (len(data.train), len(data.val), len(data.test)) == (45000, 5000, 10000)
    assert data.train.images.dtype == torch.uint8 and data.train.images.shape[1:] == (3, 32, 32)
    assert data.classes[9] == "truck"


def test_augmentation_equals_a_per_image_crop_and_flip():
    images = torch.randint(1, 256, (16, 3, 32, 32), generator=torch.Generator().manual_seed(1)).to(torch.uint8)
    out = augment(images, torch.Generator().manual_seed(0))
    draws = torch.Generator().manual_seed(0)
    dx, dy = torch.randint(0, 9, (16,), generator=draws), torch.randint(0, 9, (16,), generator=draws)
    flip = torch.rand(16, generator=draws) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(16):
        expected = padded[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        assert torch.equal(out[i], expected.flip(-1) if flip[i] else expected)
    assert flip.any() and (~flip).any() and (dx != 4).any()


@pytest.mark.slow
@needs_data
def test_salun_forgets_a_class_on_a_cifar10_slice(tmp_path):
    original = tmp_path / "original"
    train(from_dict(TrainConfig, {"out": str(original), "dataset": "cifar10", "data_dir": str(DATA), "arch": "cnn",
                                  "width": 8, "epochs": 2, "batch_size": 128, "lr": 0.1, "train_limit": 4000,
                                  "augment": True, "checkpoint_every": 0}))
    metrics = unlearn(from_dict(UnlearnConfig, {"original": str(original), "out": str(tmp_path / "salun"),
                                                "method": "salun", "forget": "class:truck", "epochs": 2,
                                                "lr": 0.02, "schedule": "constant", "checkpoint_every": 0}))
    assert metrics["UA"] > 80
