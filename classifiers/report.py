"""The comparison report of `erasure classifier compare`: a Markdown table like the papers' and metrics.json."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from classifiers.metrics import GAP_METRICS, PROTOCOL
from classifiers.plot import gap_vs_time
from erasure.evaluation.report import write_report

COLUMNS = ("FA", *GAP_METRICS, "Avg.Gap", "RTE")
STD = ".std"  # suffix of a metric's standard deviation over seeds
GAP_PLOT = "gap_vs_time.png"


def _cell(metrics: dict[str, Any], column: str) -> str:
    """One value (FA = 100 - UA), with ± its standard deviation when the metrics are a mean over seeds."""
    source = "UA" if column == "FA" else column
    value, std = metrics.get(source), metrics.get(source + STD)
    if value is None:
        return "-"
    text = f"{100.0 - value if column == 'FA' else value:.2f}"
    return text if std is None else f"{text} ± {std:.2f}"


def _row(name: str, metrics: dict[str, Any]) -> str:
    return "| " + " | ".join([name, *(_cell(metrics, column) for column in COLUMNS)]) + " |"


def comparison_table(summary: dict[str, Any]) -> str:
    """The Markdown table: one row per model, FA/UA/RA/TA/MIA in percent, Avg.Gap to retrain, RTE in seconds."""
    lines = ["| method | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 1)]
    lines.append(_row("original", summary["original"]))
    lines += [_row(name, metrics) for name, metrics in summary["methods"].items()]
    return "\n".join(lines)


def _mean_and_std(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample standard deviation (key + '.std') of every numeric metric the runs share."""
    out: dict[str, float] = {}
    for key, value in runs[0].items():
        values = [run.get(key) for run in runs]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and all(
                isinstance(v, (int, float)) for v in values):
            out[key], out[key + STD] = statistics.fmean(values), statistics.stdev(values)
    return out


def mean_and_std(per_seed: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The summary of several per-seed comparisons: each model's metrics as mean and std over seeds."""
    summaries = list(per_seed.values())
    first = summaries[0]
    return {**PROTOCOL.stamp(), "forget": first["forget"], "seeds": [int(s) for s in per_seed],
            "original": _mean_and_std([s["original"] for s in summaries]),
            "methods": {name: _mean_and_std([s["methods"][name] for s in summaries]) for name in first["methods"]},
            "per_seed": per_seed}


def write_comparison(folder: Path, summary: dict[str, Any]) -> str:
    """Write report.md (and the Avg.Gap plot) into `folder` (metrics.json is the run's own); returns the table."""
    table = comparison_table(summary)
    seeds = summary.get("seeds")
    over = f" Mean ± sample std over seeds {', '.join(map(str, seeds))}." if seeds else ""
    result = (f"Forget `{summary['forget']}`. FA = forget accuracy, UA = 1 - FA, RA = retain accuracy, "
              "TA = test accuracy (class-wise: remaining classes), MIA = MIA-efficacy, all in percent; Avg.Gap = mean "
              "|metric - retrain| over UA, RA, TA, MIA; RTE = wall seconds of the unlearning step (mask included)."
              f"{over}\n\n{table}")
    sections = [("Result", result)]
    points = {name: (m["RTE"], m["Avg.Gap"]) for name, m in summary["methods"].items() if "Avg.Gap" in m}
    if points:
        gap_vs_time(points, folder / GAP_PLOT, f"forget {summary['forget']}: Avg.Gap against run time")
        sections.append(("Avg.Gap against run time", f"![Avg.Gap against run time]({GAP_PLOT})"))
    write_report(folder / "report.md", PROTOCOL, sections)
    return table
