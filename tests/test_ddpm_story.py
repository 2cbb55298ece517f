"""scripts/ddpm_story.py on tiny configs: every stage runs once, a second call reuses them all."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from helpers.data import needs_cifar10

pytestmark = needs_cifar10

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ddpm_story.py"


def tiny_story(folder: Path) -> dict[str, str]:
    """Config files of a story small enough for a test (8x8 images, a few steps each)."""
    out = folder / "out"
    configs = {
        "judge": {"out": str(out / "judge"), "dataset": "cifar10", "resolution": 8, "arch": "cnn", "width": 4,
                  "epochs": 1, "train_limit": 256},
        "train": {"preset": "tiny", "resolution": 8, "out": str(out / "ddpm"), "steps": 3, "batch_size": 8,
                  "train_limit": 128, "warmup": 1, "checkpoint_every": 0},
        "unlearn": {"run": str(out / "ddpm"), "forget": "cat", "steps": 2, "forget_batch_size": 4,
                    "retain_batch_size": 4, "salun": {"mask_batches": 2}, "checkpoint_every": 0},
        "eval": {"n_forget": 4, "n_per_class": 2, "steps": 2},
    }
    for name, config in configs.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(config))
    return {name: str(folder / f"{name}.yaml") for name in configs}


@pytest.mark.slow  # 25 s: the story end to end; its stages are tested one by one in test_ddpm.py
def test_the_story_runs_every_stage_then_reuses_them(tmp_path: Path, monkeypatch, capsys) -> None:
    spec = importlib.util.spec_from_file_location("ddpm_story", SCRIPT)
    story = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(story)
    monkeypatch.setitem(story.STORIES, "tiny", tiny_story(tmp_path))

    def run() -> dict:
        monkeypatch.setattr("sys.argv", ["ddpm_story.py", "--story", "tiny", "--methods", "salun", "rl"])
        capsys.readouterr()
        story.main()
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    first = run()
    assert set(first["stages"]) == {"judge", "train", "retrain", "unlearn_salun", "unlearn_rl", "eval_retrain",
                                    "eval_salun", "eval_rl"}
    assert not any(stage["reused"] for stage in first["stages"].values())
    assert set(first["results"]) == {"original", "retrain", "salun", "rl", "distance_metric"}
    assert 0 <= first["results"]["salun"]["UA"] <= 100 and "change_vs_original" in first["results"]["salun"]
    second = run()
    assert all(stage["reused"] and stage["seconds"] is None for stage in second["stages"].values())
    assert second["results"] == first["results"]
    monkeypatch.setattr("sys.argv", ["ddpm_story.py", "--story", "tiny", "--no-retrain", "--alpha", "0.5",
                                     "--steps", "1"])
    story.main()
    manifest = json.loads((tmp_path / "out" / "ddpm-salun-cat-alpha0.5-steps1" / "manifest.json").read_text())
    assert manifest["config"]["alpha"] == 0.5 and manifest["config"]["steps"] == 1
