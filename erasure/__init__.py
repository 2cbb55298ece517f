"""erasure: weight-saliency machine unlearning for classifiers and diffusion models."""
from __future__ import annotations

__version__ = "0.1.0"
