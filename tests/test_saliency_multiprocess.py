"""Two CPU processes under `accelerate launch` build the same mask as one process does."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch

from erasure.saliency import Mask, compute_mask

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "helpers" / "mask_worker.py"


def load_worker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mask_worker", WORKER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(out_dir: Path) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(WORKER), str(out_dir),
    ]
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)


def test_two_processes_build_the_one_process_mask(tmp_path: Path) -> None:
    result = launch(tmp_path)
    log = f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
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
