"""The comparison report's plot: Avg.Gap against run time, one point per method named in the legend (matplotlib).

Methods often land close together (similar run times and gaps), so names go in a legend rather than
beside the points, where they would overlap.
"""
from __future__ import annotations

from pathlib import Path

from erasure.io import atomic_path

DPI = 150
MARKERS = "osD^vP*Xph<>"


def gap_vs_time(points: dict[str, tuple[float, float]], path: Path, title: str) -> None:
    """Write a PNG with one labelled point per method: x = run time (s, log scale), y = Avg.Gap (%)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    try:
        for index, (name, (seconds, gap)) in enumerate(points.items()):
            axes.scatter(seconds, gap, s=48, marker=MARKERS[index % len(MARKERS)], label=name, zorder=3)
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))  # plain numbers, no 2x10^0
        axes.set_xlabel("run time of the unlearning step (s, log scale)")
        axes.set_ylabel("Avg.Gap to retrain (percentage points)")
        axes.set_title(title)
        axes.grid(True, which="both", alpha=0.3)
        axes.margins(x=0.15, y=0.15)
        axes.legend(title="method", loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
        with atomic_path(path) as tmp:
            figure.savefig(tmp, format="png", dpi=DPI)
    finally:
        plt.close(figure)
