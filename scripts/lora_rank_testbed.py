"""What a LoRA export keeps of an erasure, measured on the CPU testbed: the erased run and its LoRA exports at
several ranks, each fused into the base testbed pipeline by diffusers (`load_lora_weights`, `fuse_lora`), judged
as `erasure bench erase` judges a method (forgetting under the quality prompt, held-out templates and synonyms;
retained accuracy; the feature distance to the base model). Writes `<out>/report.md`, one `lora-r<rank>/` export
per rank, and prints one JSON line.

    python scripts/lora_rank_testbed.py --run outputs/bench-airplane/runs/airplane/salun/seed0/run --classes airplane \
        --ranks 4 16 --out outputs/lora-rank-testbed
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from erasure.cli import main as erasure
from erasure.config import load_config
from erasure.evaluation.fid import fid_kid
from erasure.evaluation.report import markdown_table
from erasure.io import atomic_open, read_json
from pipelines.bench_config import BenchEraseConfig
from pipelines.bench_erase import judge_pipeline
from pipelines.loading import load_base_pipeline, load_erased_pipeline
from pipelines.testbed_eval import load_judge

COLUMNS = ("forget_erased_pct", "held_out_erased_pct", "synonyms_erased_pct", "retained_accuracy",
           "feature_distance")


def lora_pipeline(run: str, rank: int, out: Path) -> Any:
    """The testbed with the run's rank-`rank` LoRA (exported once into `out`) fused by diffusers."""
    if not (out / "metrics.json").is_file():
        if erasure(["export", "--run", run, "--format", "lora", "--rank", str(rank), "--out", str(out)]) != 0:
            raise SystemExit(f"lora_rank_testbed: exporting rank {rank} failed")
    pipe = load_base_pipeline("testbed")
    pipe.load_lora_weights(str(out))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return pipe


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished `erasure sd` run on the testbed")
    parser.add_argument("--classes", nargs="+", required=True, help="the classes it erased")
    parser.add_argument("--ranks", nargs="+", type=int, default=[4, 16], help="LoRA ranks to export and judge")
    parser.add_argument("--config", default="configs/bench_erase_testbed.yaml",
                        help="the benchmark config whose judging settings (images per prompt, steps) apply")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    out = Path(args.out)
    config = load_config(BenchEraseConfig, args.config, {"out": str(out)})
    judge = load_judge(config.judge)
    seed = config.seeds[0]
    models = {"base": lambda: load_base_pipeline("testbed"),
              "erased": lambda: load_erased_pipeline("testbed", args.run),
              **{f"lora rank {rank}": (lambda rank=rank: lora_pipeline(args.run, rank, out / f"lora-r{rank}"))
                 for rank in args.ranks}}
    rows, base_features = {}, None
    for name, build in models.items():
        result, features, _ = judge_pipeline(build(), judge, args.classes, seed, config)
        base_features = features if base_features is None else base_features
        result["feature_distance"] = round(fid_kid(features, base_features, seed=seed)["fid"], 3)
        rows[name] = result
    exports = {rank: read_json(out / f"lora-r{rank}" / "metrics.json") for rank in args.ranks}
    for rank, metrics in exports.items():
        rows[f"lora rank {rank}"].update(mean_relative_error=round(metrics["mean_relative_error"], 4),
                                         prediction_error=round(metrics["prediction_error"], 4))
    command = " ".join(["scripts/lora_rank_testbed.py", *argv])
    table = markdown_table(["model", *COLUMNS, "mean relative weight error", "prediction error"],
                           [(name, *(row[c] for c in COLUMNS), row.get("mean_relative_error", "—"),
                             row.get("prediction_error", "—")) for name, row in rows.items()])
    out.mkdir(parents=True, exist_ok=True)
    with atomic_open(out / "report.md", "w") as handle:
        handle.write(f"# A LoRA export's erasure on the testbed\n\nCommand: `{command}`\n\n{table}\n")
    summary = {"command": command, "rows": rows}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
