"""The comparison report of `erasure classifier compare`: a Markdown table like the papers' and metrics.json."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from classifiers.metrics import GAP_METRICS
from classifiers.plot import gap_vs_time
from erasure.io import atomic_open

COLUMNS = (*GAP_METRICS, "Avg.Gap", "RTE")


def _row(name: str, metrics: dict[str, Any]) -> str:
    cells = [name]
    for column in COLUMNS:
        value = metrics.get(column)
        cells.append("-" if value is None else f"{value:.2f}")
    return "| " + " | ".join(cells) + " |"


def comparison_table(summary: dict[str, Any]) -> str:
    """The Markdown table: one row per model, UA/RA/TA/MIA in percent, Avg.Gap to retrain, RTE in seconds."""
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    lines.append(_row("original", summary["original"]))
    lines += [_row(name, metrics) for name, metrics in summary["methods"].items()]
    return "\n".join(lines)


def write_comparison(folder: Path, summary: dict[str, Any]) -> str:
    """Write report.md into `folder` (metrics.json is the run's own); returns the table."""
    table = comparison_table(summary)
    text = (f"# Classifier unlearning: forget `{summary['forget']}`\n\n"
            f"Protocol `{summary['protocol']}`. UA = 1 - forget accuracy, RA = retain accuracy, TA = test accuracy "
            "(class-wise: remaining classes), MIA = MIA-efficacy, all in percent; Avg.Gap = mean |metric - retrain| "
            "over UA, RA, TA, MIA; RTE = wall seconds of the unlearning step (mask included).\n\n"
            f"{table}\n")
    points = {name: (m["RTE"], m["Avg.Gap"]) for name, m in summary["methods"].items() if "Avg.Gap" in m}
    if points:
        gap_vs_time(points, folder / "gap_vs_time.png", f"forget {summary['forget']}: Avg.Gap vs run time")
        text += "\n![Avg.Gap against run time](gap_vs_time.png)\n"
    with atomic_open(folder / "report.md", "w") as handle:
        handle.write(text)
    return table
