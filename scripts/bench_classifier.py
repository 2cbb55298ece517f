"""Benchmark classifier training: our device-resident pipeline against a plain DataLoader loop.

Trains the same architecture with the same recipe (optimizer, schedule, epochs, batch) twice:
1. `erasure classifier train` (uint8 data on the device, batched augmentation, bf16 autocast and
   channels-last on CUDA, optional torch.compile);
2. a plain PyTorch loop: a `Dataset` that crops and flips each image in `__getitem__`, a
   `DataLoader` with workers, fp32 — what a typical training script does.
Prints one JSON line: seconds and test accuracy of both, and the speed-up.

    python scripts/bench_classifier.py --config configs/classifier_cifar10_train.yaml      # the H100 goal
    python scripts/bench_classifier.py --config configs/classifier_cifar10_cpu_train.yaml --subset 5000 --epochs 1
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/classifier_cifar10_train.yaml", help="a `classifier train` config")
    parser.add_argument("--epochs", type=int, default=None, help="override the config's epochs")
    parser.add_argument("--subset", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the plain DataLoader baseline")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="baseline DataLoader workers")
    return parser.parse_args()


class PlainCIFAR(torch.utils.data.Dataset):
    """Per-image crop (pad 4) and flip in numpy, as torchvision-style pipelines do."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment: bool):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = self.images[i]
        if self.augment:
            padded = np.pad(image, ((0, 0), (4, 4), (4, 4)))
            dx, dy = np.random.randint(0, 9, 2)
            image = padded[:, dy:dy + image.shape[1], dx:dx + image.shape[2]]
            if np.random.rand() < 0.5:
                image = image[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image)).float().div_(255.0), int(self.labels[i])


def plain_baseline(config, data, device: torch.device, workers: int) -> tuple[float, float]:
    """Train with a plain DataLoader loop; returns (seconds, test accuracy %)."""
    from classifiers.loop import build_optimizer, learning_rate
    from classifiers.metrics import accuracy, predict_proba
    from classifiers.models import build_model, spec_for

    torch.manual_seed(config.seed)
    model = build_model(spec_for(config.arch, config.dataset, data.image_shape, data.num_classes, config.width))
    model.to(device)
    optimizer = build_optimizer(list(model.parameters()), config)
    loader = torch.utils.data.DataLoader(
        PlainCIFAR(data.train.images.numpy(), data.train.labels.numpy(), config.augment),
        batch_size=config.batch_size, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        persistent_workers=workers > 0)
    total = len(loader) * config.epochs
    step = 0
    started = time.perf_counter()
    model.train()
    for _ in range(config.epochs):
        for x, y in loader:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config, step, total)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=config.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    test = data.test.to(device)
    return seconds, accuracy(predict_proba(model, test), test.labels)


def main() -> None:
    args = _parse()
    if torch.cuda.is_available():
        os.environ.setdefault("ACCELERATE_MIXED_PRECISION", "bf16")
    from classifiers.commands import dataset_for, train
    from classifiers.config import TrainConfig
    from erasure.config import load_config

    overrides = {"epochs": args.epochs} if args.epochs else {}
    if args.subset:
        overrides["train_limit"] = args.subset
    with tempfile.TemporaryDirectory() as tmp:
        overrides.update(out=str(Path(tmp) / "run"), checkpoint_every=0)
        config = load_config(TrainConfig, args.config, overrides)
        started = time.perf_counter()
        ours = train(config)
        ours_total = time.perf_counter() - started
    data = dataset_for(config, torch.device("cpu"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "figure": "classifier_train",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "config": {"file": args.config, "arch": config.arch, "epochs": config.epochs, "batch_size": config.batch_size,
                   "train_images": len(data.train),
                   "mixed_precision": os.environ.get("ACCELERATE_MIXED_PRECISION", "no"),
                   "channels_last": config.channels_last, "compile": config.compile},
        "seconds": round(ours["train_seconds"], 2),
        "seconds_with_setup": round(ours_total, 2),
        "test_acc": round(ours["test_acc"], 2),
        "torch": torch.__version__,
    }
    if args.baseline:
        seconds, acc = plain_baseline(config, data, device, args.workers)
        result.update(baseline="plain DataLoader, fp32, NCHW", baseline_seconds=round(seconds, 2),
                      baseline_test_acc=round(acc, 2), speedup_vs_baseline=round(seconds / ours["train_seconds"], 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
