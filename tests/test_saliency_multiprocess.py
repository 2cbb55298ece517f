"""Two CPU processes under `accelerate launch` build the same mask as one process does."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers.launch import REPO, accelerate_launch, log_of

from erasure.saliency import Mask, compute_mask

WORKER = REPO / "tests" / "helpers" / "mask_worker.py"


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mask_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # the default suite ran 324 s of its 300 s budget
def test_two_processes_build_the_one_process_mask(tmp_path: Path) -> None:
    result = accelerate_launch(WORKER, tmp_path, timeout=120)
    log = log_of(result)
    ranks = [Mask.load(tmp_path / f"rank{r}.safetensors") for r in (0, 1)]  # judged by the files, not the exit code
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["num_processes"] for s in seen] == [2, 2] and all(s["wrapped"] for s in seen), log

    worker = load_worker()
    model, batches = worker.build_model(), worker.build_batches()
    single = compute_mask(model, batches, worker.loss_fn, ratio=worker.RATIO, progress=False)
    for mask in ranks:
        assert list(mask) == list(single)
        assert all(torch.equal(mask[n], single[n]) for n in single), log
        assert mask.metadata["world_size"] == 2
        assert mask.metadata["forget_samples"] == single.metadata["forget_samples"] == 30
        assert mask.metadata["kept"] == single.metadata["kept"]
