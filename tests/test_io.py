"""Run directories: atomic writes, refusing to clobber, manifests."""
from __future__ import annotations

import json

import pytest
import torch

from erasure.errors import RunDirError
from erasure.io import RunDir, atomic_open, finished_run, reusable_run, write_json


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_open(path, "w") as handle:
            handle.write("{ half")
            raise RuntimeError("crash mid-write")
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_manifest_records_what_reproduces_the_run(tmp_path):
    run = RunDir(tmp_path / "run")
    run.start({"lr": 0.1}, seed=3, device="cpu", kind="test")
    run.finish({"acc": 0.9})
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["config"] == {"lr": 0.1} and manifest["seed"] == 3 and manifest["device"] == "cpu"
    assert {"torch", "python", "erasure"} <= set(manifest["versions"])
    assert "git_commit" in manifest and manifest["wall_seconds"] >= 0
    assert manifest["cpu_threads"] == torch.get_num_threads()
    assert manifest["started"] <= manifest["ended"]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text()) == {"acc": 0.9}


def test_a_finished_run_is_refused_unless_overwrite(tmp_path):
    run = RunDir(tmp_path / "run")
    run.start({}, seed=0, device="cpu", kind="test")
    run.finish({})
    with pytest.raises(RunDirError, match="finished run.*--overwrite"):
        RunDir(tmp_path / "run")
    RunDir(tmp_path / "run", overwrite=True)
    assert not (tmp_path / "run").exists()


def test_only_a_run_that_collects_others_reopens_when_finished(tmp_path):
    run = RunDir(tmp_path / "run")
    run.start({"methods": ["rl"]}, seed=0, device="cpu", kind="test")
    run.finish({})
    with pytest.raises(RunDirError, match="finished run; pass --overwrite"):
        RunDir(tmp_path / "run", resume=True)
    with pytest.raises(RunDirError, match="pass --resume to add to it"):
        RunDir(tmp_path / "run", reopen=True)
    reopened = RunDir(tmp_path / "run", resume=True, reopen=True)
    reopened.start({"methods": ["rl", "salun"]}, seed=0, device="cpu", kind="test")
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert reopened.resumed and manifest["status"] == "running" and len(manifest["resumed_at"]) == 1


def test_reusable_run_names_the_settings_that_changed(tmp_path):
    run = RunDir(tmp_path / "run")
    run.start({"lr": 0.1, "epochs": [1, 2], "out": "a"}, seed=0, device="cpu", kind="test")
    assert reusable_run(tmp_path / "run", {"lr": 0.1}) is None  # not finished: nothing to reuse
    run.finish({"UA": 1.0})
    assert reusable_run(tmp_path / "run", {"lr": 0.1, "epochs": (1, 2), "out": "b"},
                        ignored=("out",))["metrics"] == {"UA": 1.0}
    with pytest.raises(RunDirError, match=r"other settings \(epochs, lr\)"):
        reusable_run(tmp_path / "run", {"lr": 0.2, "epochs": [1], "out": "a"})
    with pytest.raises(RunDirError, match=r"other settings \(new\)"):  # not recorded: maybe made without it
        reusable_run(tmp_path / "run", {"lr": 0.1, "epochs": [1, 2], "new": 3}, ignored=("out",))


def test_an_unfinished_run_needs_resume_or_overwrite(tmp_path):
    RunDir(tmp_path / "run").start({}, seed=0, device="cpu", kind="test")
    with pytest.raises(RunDirError, match="--resume"):
        RunDir(tmp_path / "run")
    assert RunDir(tmp_path / "run", resume=True).resumed


def test_a_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not empty"):
        RunDir(tmp_path)
    assert (tmp_path / "precious.txt").exists()


def test_finished_run_explains_what_is_missing(tmp_path):
    with pytest.raises(RunDirError, match="not a run directory"):
        finished_run(tmp_path, "train")


def test_atomic_dir_swaps_in_a_finished_folder_and_keeps_the_old_one_on_failure(tmp_path):
    from erasure.io import atomic_dir

    target = tmp_path / "unet"
    with atomic_dir(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").is_file()
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("crash mid-save")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["unet"]
