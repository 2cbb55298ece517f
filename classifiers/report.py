"""The comparison report of `erasure classifier compare`: a Markdown table like the papers' and metrics.json."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from classifiers.metrics import GAP_METRICS, PROTOCOL
from classifiers.plot import gap_vs_time
from classifiers.search import search_table
from erasure.evaluation.report import write_report

COLUMNS = ("FA", *GAP_METRICS, "Avg.Gap", "RTE")
LIRA_COLUMNS = ("LiRA.AUC", "LiRA.TPR@1%")
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


def _columns(summary: dict[str, Any]) -> tuple[str, ...]:
    """The table's columns: the paper's, and LiRA's when the comparison ran it."""
    return COLUMNS + LIRA_COLUMNS if LIRA_COLUMNS[0] in summary["original"] else COLUMNS


def comparison_table(summary: dict[str, Any]) -> str:
    """The Markdown table: one row per model, FA/UA/RA/TA/MIA in percent, Avg.Gap to retrain, RTE in seconds."""
    columns = _columns(summary)
    rows = [("original", summary["original"]), *summary["methods"].items()]
    lines = ["| method | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([name, *(_cell(metrics, c) for c in columns)]) + " |" for name, metrics in rows]
    return "\n".join(lines)


def attack_agreement(summary: dict[str, Any]) -> str:
    """Where MIA-efficacy and LiRA disagree: each model's rank by its distance to retrain under either attack."""
    reference = summary["methods"]["retrain"]
    models = {"original": summary["original"],
              **{name: m for name, m in summary["methods"].items() if name != "retrain"}}

    def ranks(key: str) -> dict[str, int]:
        order = sorted(models, key=lambda name: abs(models[name][key] - reference[key]))
        return {name: order.index(name) + 1 for name in models}

    mia, lira = ranks("MIA"), ranks("LiRA.AUC")
    lines = ["| model | MIA distance to retrain | rank | LiRA AUC distance to retrain | rank | attacks agree |",
             "|---|---|---|---|---|---|"]
    for name, m in models.items():
        lines.append(f"| {name} | {abs(m['MIA'] - reference['MIA']):.2f} | {mia[name]} | "
                     f"{abs(m['LiRA.AUC'] - reference['LiRA.AUC']):.2f} | {lira[name]} | "
                     f"{'yes' if mia[name] == lira[name] else '**no**'} |")
    return ("Each model ranked by how close each attack finds it to the retrained model (1 = closest); "
            "a method that looks private to the weak attacker but not to LiRA has not forgotten.\n\n"
            + "\n".join(lines))


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
              "|metric - retrain| over UA, RA, TA, MIA; RTE = wall seconds of the unlearning step (mask included); "
              "LiRA.AUC / LiRA.TPR@1% (when run) = offline LiRA telling forget samples from held-out ones, "
              "AUC and true positives at 1 % false positives, in percent."
              f"{over}\n\n{table}")
    sections = [("Result", result)]
    if LIRA_COLUMNS[0] in summary["original"]:
        sections.append(("Two membership attacks", attack_agreement(summary)))
    searches = {"": summary["search"]} if "search" in summary else {
        f"seed {seed}: ": s["search"] for seed, s in summary.get("per_seed", {}).items() if "search" in s}
    if searches:
        text = ("Settings chosen per method by a grid search on validation data (Avg.Gap to retrain over UA, RA, "
                "validation accuracy and MIA-efficacy with validation images as non-members); no test image is "
                "read to select. The selected point (bold) is the method's row above.")
        tables = [f"{prefix}{search_table(method, result)}" for prefix, by_method in searches.items()
                  for method, result in by_method.items()]
        sections.append(("Settings search", "\n\n".join([text, *tables])))
    points = {name: (m["RTE"], m["Avg.Gap"]) for name, m in summary["methods"].items() if "Avg.Gap" in m}
    if points:
        gap_vs_time(points, folder / GAP_PLOT, f"forget {summary['forget']}: Avg.Gap against run time")
        sections.append(("Avg.Gap against run time", f"![Avg.Gap against run time]({GAP_PLOT})"))
    write_report(folder / "report.md", PROTOCOL, sections)
    return table
