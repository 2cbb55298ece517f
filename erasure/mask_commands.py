"""`erasure mask show`: what a mask file holds (domain-neutral: any model's mask)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from erasure.config import option
from erasure.errors import ConfigError


@dataclass
class ShowMaskConfig:
    """Print a mask file's metadata and per-parameter density."""

    path: str = option("", "the mask file (.safetensors) to describe")
    top: int = option(20, "how many parameters to list (densest first); 0 lists all", ge=0)

    def validate(self) -> None:
        """A path is required."""
        if not self.path:
            raise ConfigError("config key 'path' is required: pass --path <mask.safetensors>")


def show_mask(config: ShowMaskConfig) -> str:
    """Describe a saved mask; returns (and prints) the text."""
    from erasure.saliency import Mask

    mask = Mask.load(config.path)
    rows = sorted(mask.stats(), key=lambda row: row["density"], reverse=True)
    if config.top:
        rows = rows[:config.top]
    width = max([len(row["name"]) for row in rows] + [9])
    lines = [json.dumps(mask.metadata, indent=2, default=str), "",
             f"{'parameter':<{width}}  {'kept':>12}  {'of':>12}  density"]
    lines += [f"{row['name']:<{width}}  {row['kept']:>12,}  {row['numel']:>12,}  {row['density']:.2%}" for row in rows]
    summary = mask.summary()
    lines.append(f"{'total':<{width}}  {summary['kept']:>12,}  {summary['numel']:>12,}  {summary['density']:.2%}")
    text = "\n".join(lines)
    print(text)
    return text
