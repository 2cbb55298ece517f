"""The penultimate features of a trained classifier as an `erasure` feature extractor.

Registered as `classifier` under the `erasure.feature_extractors` entry points (pyproject.toml), so
`erasure eval fid --features classifier:<run>` uses it; the DDPM protocol uses it directly. The
distance it gives is a Fréchet distance in the classifier's feature space, never FID.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from classifiers.models import MODEL_FILE, load_model, to_input
from erasure.errors import ConfigError
from erasure.io import finished_run


class ClassifierFeatures(nn.Module):
    """Penultimate features of a finished `erasure classifier train` run (uint8 NCHW images in)."""

    def __init__(self, run_dir: str | None):
        super().__init__()
        if not run_dir:
            raise ConfigError("the classifier extractor needs a run directory: pass classifier:<run dir>")
        finished_run(run_dir, "`erasure classifier train`")
        self.run_dir = str(run_dir)
        self.model = load_model(Path(run_dir) / MODEL_FILE).eval()
        self.input_size = self.model.spec.image_size
        self.num_features = int(self.model.head.in_features)

    def forward(self, images: Tensor) -> Tensor:
        """Penultimate activations of uint8 NCHW images."""
        return self.model.features(to_input(images))

    def describe(self) -> dict[str, Any]:
        """What the report says about this extractor."""
        return {"name": "classifier", "model": f"classifier penultimate features ({self.run_dir}); not FID",
                "num_features": self.num_features, "input_size": self.input_size}
