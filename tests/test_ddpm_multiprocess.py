"""Two CPU processes under `accelerate launch`: DDPM training and SalUn unlearning run end to end, the
mask equals the one-process mask, and the weights outside it are the original's, bit for bit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.data import needs_cifar10
from helpers.launch import REPO, accelerate_launch, log_of

from erasure.saliency import Mask

pytestmark = needs_cifar10

ERASE = REPO / "erase.py"
TRAIN = ["ddpm", "train", "--preset", "tiny", "--resolution", "8", "--steps", "3", "--batch-size", "8",
         "--train-limit", "64", "--warmup", "1", "--checkpoint-every", "0"]
UNLEARN = ["ddpm", "unlearn", "--forget", "cat", "--steps", "2", "--forget-batch-size", "4",
           "--retain-batch-size", "4", "--mask-batches", "3", "--lr", "1e-3", "--checkpoint-every", "0"]


@pytest.mark.slow  # 45 s: two-process equivalence is also tested for the mask engine and SD in the default suite
def test_two_processes_train_and_unlearn_with_the_one_process_mask(tmp_path: Path, run_cli) -> None:
    from pipelines.ddpm import load_model

    trained, unlearned = tmp_path / "trained", tmp_path / "salun2"
    result = accelerate_launch(ERASE, *TRAIN, "--out", trained)
    assert result.returncode == 0, log_of(result)
    result = accelerate_launch(ERASE, *UNLEARN, "--run", trained, "--out", unlearned)
    assert result.returncode == 0, log_of(result)
    manifest = json.loads((unlearned / "manifest.json").read_text())
    assert manifest["status"] == "finished"
    assert manifest["metrics"]["forget_objective_after"] < manifest["metrics"]["forget_objective_before"]

    status, log = run_cli(*UNLEARN, "--run", trained, "--out", tmp_path / "salun1")
    assert status == 0, log
    two, one = Mask.load(unlearned / "mask.safetensors"), Mask.load(tmp_path / "salun1" / "mask.safetensors")
    assert two.metadata["world_size"] == 2 and one.metadata["world_size"] == 1
    assert all(torch.equal(two[name], one[name]) for name in one)

    before, after = load_model(trained)[0].state_dict(), load_model(unlearned)[0].state_dict()
    changed = False
    for name in two:
        keep = two[name]
        assert torch.equal(after[name][~keep], before[name][~keep]), name
        changed |= not torch.equal(after[name][keep], before[name][keep])
    assert changed
