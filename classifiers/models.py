"""Classifier architectures and their safetensors files (weights + the spec that rebuilds them).

Every model takes uint8-range images as floats in [0, 1] after `to_input`, normalises them itself,
and exposes `features(x)` (penultimate activations) so evaluation can reuse it as a feature extractor.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from erasure.errors import ConfigError
from erasure.io import atomic_path

SPEC_KEY = "erasure.classifier"
MODEL_FILE = "model.safetensors"
"""The file name of a classifier run's weights and spec."""

@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a classifier before loading its weights."""

    arch: str
    in_channels: int
    image_size: int
    num_classes: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class Classifier(nn.Module):
    """Normalisation + a feature trunk + a linear head."""

    def __init__(self, spec: ModelSpec, trunk: nn.Module, feature_dim: int):
        super().__init__()
        self.spec = spec
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)
        self.trunk = trunk
        self.head = nn.Linear(feature_dim, spec.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations of images in [0, 1]."""
        return self.trunk((x - self.mean) / self.std)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def to_input(images: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 images (N, C, H, W) to floats in [0, 1]."""
    return images.to(dtype).div_(255.0)


def _mlp(spec: ModelSpec) -> tuple[nn.Module, int]:
    size = spec.in_channels * spec.image_size**2
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(size, spec.width), nn.ReLU(),
                          nn.Linear(spec.width, spec.width), nn.ReLU())
    return trunk, spec.width


def _cnn(spec: ModelSpec) -> tuple[nn.Module, int]:
    w = spec.width

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    trunk = nn.Sequential(block(spec.in_channels, w), block(w, 2 * w), nn.MaxPool2d(2),
                          block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return trunk, 4 * w


class BasicBlock(nn.Module):
    """The ResNet basic block (two 3x3 convolutions with a shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def _resnet18(spec: ModelSpec) -> tuple[nn.Module, int]:
    """CIFAR ResNet-18: 3x3 stem, no max-pool, stages of 2 blocks at widths w, 2w, 4w, 8w."""
    w = spec.width
    layers: list[nn.Module] = [nn.Conv2d(spec.in_channels, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
    cin = w
    for i, cout in enumerate((w, 2 * w, 4 * w, 8 * w)):
        stride = 1 if i == 0 else 2
        layers += [nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), cin


ARCHITECTURES = {"mlp": _mlp, "cnn": _cnn, "resnet18": _resnet18}
DATASET_STATS = {
    "digits": ((0.3,), (0.4,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def build_model(spec: ModelSpec) -> Classifier:
    """A freshly initialised classifier (seed torch beforehand for a reproducible init)."""
    if spec.arch not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture '{spec.arch}'; choose one of: {', '.join(ARCHITECTURES)}")
    trunk, feature_dim = ARCHITECTURES[spec.arch](spec)
    return Classifier(spec, trunk, feature_dim)


def spec_for(arch: str, dataset: str, image_shape: tuple[int, int, int], num_classes: int, width: int) -> ModelSpec:
    """The spec of `arch` for a dataset's image shape and classes."""
    mean, std = DATASET_STATS[dataset]
    return ModelSpec(arch, image_shape[0], image_shape[1], num_classes, width, mean, std)


def save_model(model: Classifier, path: str | Path) -> None:
    """Write weights and spec to one safetensors file, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={SPEC_KEY: json.dumps(asdict(model.spec))})


def load_model(path: str | Path) -> Classifier:
    """Rebuild a classifier from its file; a file of another architecture is a clear error."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model file '{path}' does not exist; pass the --out folder of a finished training run")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if SPEC_KEY not in metadata:
        raise ConfigError(f"'{path}' is not an erasure classifier file (no '{SPEC_KEY}' metadata)")
    raw = json.loads(metadata[SPEC_KEY])
    spec = ModelSpec(**{**raw, "mean": tuple(raw["mean"]), "std": tuple(raw["std"])})
    model = build_model(spec)
    state = load_file(str(path))
    expected = model.state_dict()
    bad = [f"missing {k}" for k in expected if k not in state]
    bad += [f"unexpected {k}" for k in state if k not in expected]
    bad += [f"{k}: file {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
            for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if bad:
        raise ConfigError(f"'{path}' does not match its architecture '{spec.arch}': {'; '.join(bad)}")
    model.load_state_dict(state)
    return model
