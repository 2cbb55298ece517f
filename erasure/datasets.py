"""Image datasets shared by the classifiers and the DDPM: uint8 tensors, seeded splits, CIFAR-10 reading.

Two datasets: scikit-learn's bundled 8x8 digits (offline, instant: the quick start and tests)
and CIFAR-10 from the shared JPEG npz (decoded once, cached as uint8, optionally average-pooled to a
smaller resolution). Splits are tensors a caller moves to its device in one step.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from erasure.errors import ConfigError
from erasure.io import atomic_path, data_dir

CIFAR10_FILE = "cifar10_jpeg.npz"
CIFAR10_SIZE = 32


@dataclass
class ImageSet:
    """Images (uint8, N x C x H x W) and integer labels, on one device."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index: Tensor) -> ImageSet:
        """The examples at `index` (a LongTensor or bool mask)."""
        return ImageSet(self.images[index], self.labels[index])

    def to(self, device: torch.device | str) -> ImageSet:
        """The same set on `device`."""
        return ImageSet(self.images.to(device), self.labels.to(device))


@dataclass
class Dataset:
    """Train / validation / test splits and the class names."""

    name: str
    train: ImageSet
    val: ImageSet
    test: ImageSet
    classes: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])  # type: ignore[return-value]

    def to(self, device: torch.device | str) -> Dataset:
        """The same splits on `device`."""
        return Dataset(self.name, self.train.to(device), self.val.to(device), self.test.to(device), self.classes)


def seeded_split(images: np.ndarray, labels: np.ndarray, n_val: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(train, validation): a seeded permutation puts `n_val` examples in validation."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images_t = torch.from_numpy(np.ascontiguousarray(images))
    labels_t = torch.from_numpy(labels.astype(np.int64))
    val, train = order[:n_val], order[n_val:]
    return ImageSet(images_t[train], labels_t[train]), ImageSet(images_t[val], labels_t[val])


def load_digits(split_seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits: 20% test (fixed), 10% validation (seeded), the rest train."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    labels = bunch.target
    fixed = np.random.default_rng(1234).permutation(len(labels))
    n_test = len(labels) // 5
    test_idx, rest_idx = fixed[:n_test], fixed[n_test:]
    train, val = seeded_split(images[rest_idx], labels[rest_idx], n_val=len(labels) // 10, seed=split_seed)
    test = ImageSet(torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx].astype(np.int64)))
    return Dataset("digits", train, val, test, [str(d) for d in range(10)])


def _decode_jpegs(blob: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    import io

    from PIL import Image

    raw = blob.tobytes()
    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(offsets) - 1):
        out[i] = np.asarray(Image.open(io.BytesIO(raw[offsets[i]:offsets[i + 1]])).convert("RGB"))
    return out


def cifar10_arrays(folder: Path) -> dict[str, np.ndarray]:
    """Decoded CIFAR-10 (uint8 NHWC) and labels, decoded once and cached beside the user's cache."""
    source = folder / CIFAR10_FILE
    if not source.is_file():
        raise ConfigError(
            f"CIFAR-10 not found at '{source}'; set data_dir in the config (or $ERASURE_DATA_DIR) "
            f"to the folder holding {CIFAR10_FILE}"
        )
    cache_dir = Path(os.environ.get("ERASURE_CACHE_DIR", Path.home() / ".cache" / "erasure"))
    stat = source.stat()
    cache = cache_dir / f"cifar10_uint8_{stat.st_size}_{int(stat.st_mtime)}.npz"
    if cache.is_file():
        return dict(np.load(cache))
    packed = dict(np.load(source))
    arrays = {
        "train_images": _decode_jpegs(packed["train_jpeg"], packed["train_offsets"]),
        "train_labels": packed["train_labels"],
        "test_images": _decode_jpegs(packed["test_jpeg"], packed["test_offsets"]),
        "test_labels": packed["test_labels"],
        "classes": packed["classes"],
    }
    with atomic_path(cache) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
    return arrays


def _check_resolution(resolution: int | None, key: str = "resolution") -> None:
    """Raise ConfigError unless `resolution` is None (native) or divides CIFAR-10's 32 pixels."""
    if resolution is not None and (resolution < 1 or CIFAR10_SIZE % resolution):
        raise ConfigError(f"config key '{key}': CIFAR-10 can be read at a divisor of {CIFAR10_SIZE} pixels "
                          f"(average-pooled from {CIFAR10_SIZE}); got {resolution}")


def downsample(images: Tensor, resolution: int) -> Tensor:
    """uint8 NCHW images average-pooled to `resolution` pixels (a divisor of their size), rounded back to uint8."""
    factor = images.shape[-1] // resolution
    if factor == 1:
        return images
    pooled = torch.nn.functional.avg_pool2d(images.float(), factor)
    return pooled.round_().clamp_(0, 255).to(torch.uint8)


def load_cifar10(folder: str | None, split_seed: int = 0, resolution: int | None = None) -> Dataset:
    """CIFAR-10 as in SalUn: 45,000 train / 5,000 validation (seeded) and the official 10,000 test.

    `resolution` (16 or 8) average-pools every image from 32 pixels: a cheaper task for quick CPU runs.
    """
    _check_resolution(resolution)
    arrays = cifar10_arrays(data_dir(folder))
    size = resolution or CIFAR10_SIZE
    train_images = downsample(torch.from_numpy(arrays["train_images"].transpose(0, 3, 1, 2)), size).numpy()
    train, val = seeded_split(train_images, arrays["train_labels"], 5000, split_seed)
    test_images = torch.from_numpy(np.ascontiguousarray(arrays["test_images"].transpose(0, 3, 1, 2)))
    test_labels = torch.from_numpy(arrays["test_labels"].astype(np.int64))
    test = ImageSet(downsample(test_images, size).contiguous(), test_labels)
    return Dataset("cifar10", train, val, test, [str(c) for c in arrays["classes"]])


def load_dataset(name: str, folder: str | None = None, split_seed: int = 0, resolution: int | None = None) -> Dataset:
    """A dataset by config name (`resolution`: CIFAR-10 only, see load_cifar10)."""
    if name == "digits":
        if resolution is not None:
            raise ConfigError("config key 'resolution' applies to cifar10 only; remove it for dataset 'digits'")
        return load_digits(split_seed)
    if name == "cifar10":
        return load_cifar10(folder, split_seed, resolution)
    raise ConfigError(f"unknown dataset '{name}'; choose digits or cifar10")
