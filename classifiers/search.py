"""Per-method settings chosen by a grid search on a validation criterion, never on the test set.

Each point of a method's grid is an ordinary unlearning run; its score is the Avg.Gap to the
retrained model over UA, RA, validation accuracy and MIA-efficacy with validation images as the
non-members (`evaluate(..., validation=True)`), so selecting a point reads no test image. The
selected point's own run (with its test metrics) becomes the method's row of the comparison.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from classifiers.data import ForgetSplit
from classifiers.metrics import average_gap, evaluate
from classifiers.models import MODEL_FILE, load_model
from erasure.config import grid
from erasure.datasets import Dataset
from erasure.errors import ErasureError, NonFiniteLossError


def search(space: dict[str, list[Any]], run_point: Callable[[Path, dict[str, Any]], Any], folder: Path,
           reference: nn.Module, data: Dataset, split: ForgetSplit, seed: int) -> dict[str, Any]:
    """Run every point of `space` (run_point(out, settings)) in a folder named after its settings and select
    the one closest to `reference` (the retrained model) on validation data. Returns the space, each point's
    settings and validation gap, and the selected point's index and folder. A wider grid over the same folder
    reuses the points it shares with the narrower one."""
    target = evaluate(reference, data, split, seed, validation=True)
    points = []
    for settings in grid(space):
        out = folder / point_name(settings)
        try:
            run_point(out, settings)
        except NonFiniteLossError as error:  # a diverging point is a result of the search, not its end
            points.append({"settings": settings, "run": str(out), "validation_gap": None, "diverged": str(error)})
            continue
        model = load_model(out / MODEL_FILE).to(data.train.labels.device)
        points.append({"settings": settings, "run": str(out), "validation_gap": average_gap(
            evaluate(model, data, split, seed, validation=True), target)})
    finite = [i for i, point in enumerate(points) if point["validation_gap"] is not None]
    if not finite:
        raise ErasureError(f"every point of the search in '{folder}' diverged; add lower learning rates to its grid")
    best = min(finite, key=lambda i: points[i]["validation_gap"])
    return {"space": space, "points": points, "selected": best, "selected_run": points[best]["run"]}


def point_name(settings: dict[str, Any]) -> str:
    """The folder of a grid point: its settings, e.g. `epochs=5,lr=0.01`."""
    return ",".join(f"{key}={value}" for key, value in sorted(settings.items()))


def search_table(method: str, result: dict[str, Any]) -> str:
    """A Markdown table of one method's search: each point's settings and validation gap, the selected one bold."""
    keys = sorted(result["space"])
    lines = [f"`{method}`: {len(result['points'])} points over "
             + ", ".join(f"{k} in {result['space'][k]}" for k in keys) + ".", "",
             "| point | " + " | ".join(keys) + " | validation Avg.Gap |", "|" + "---|" * (len(keys) + 2)]
    for i, point in enumerate(result["points"]):
        mark = "**" if i == result["selected"] else ""
        cells = [f"{mark}{i}{mark}", *(str(point["settings"][k]) for k in keys), _gap(point)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _gap(point: dict[str, Any]) -> str:
    return "diverged" if point["validation_gap"] is None else f"{point['validation_gap']:.2f}"
