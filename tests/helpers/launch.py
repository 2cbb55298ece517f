"""Run a script under `accelerate launch` with two CPU processes (gloo), as the multi-process tests do; the tiny
`erasure sd` run they launch, with or without FSDP."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ERASE = REPO / "erase.py"
FSDP_CPU = REPO / "tests" / "helpers" / "fsdp_cpu.py"


def free_port() -> int:
    """A TCP port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(script: Path, *args: object, timeout: int = 300, mode: tuple[str, ...] = ("--multi_gpu",),
                      env: dict[str, str] | None = None, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch <mode> --num_processes <processes> script args` (on the CPU unless CUDA is there), with
    `env` added to the environment; returns the finished process (never raises)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), str(script), *map(str, args),
    ]
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        **(env or {}),
    }
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)


def log_of(result: subprocess.CompletedProcess) -> str:
    """Exit status and the tails of both streams, for assertion messages."""
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def launch_erasure(model_dir: Path, run: Path, out: Path, *extra: object, fsdp: tuple[str, ...] = (),
                   env: dict[str, str] | None = None) -> str:
    """`erasure sd` of the tiny config on `model_dir` in two CPU processes, reusing a finished one-process `run`'s
    images (2 steps at lr 1e-3, no grid or delta, then `extra`); under the `fsdp` launch flags it runs through
    fsdp_cpu.py. Returns the log."""
    args = ["sd", "--config", str(REPO / "configs" / "sd_tiny.yaml"), "--model", str(model_dir), "--out", str(out),
            "--forget-images", str(run / "data" / "forget"), "--retain-images", str(run / "data" / "retain"),
            "--steps", "2", "--lr", "0.001", "--grid-seeds", "0", "--no-export-delta", *extra]
    result = accelerate_launch(FSDP_CPU, *args, mode=fsdp, env=env) if fsdp else accelerate_launch(ERASE, *args)
    return log_of(result)


def erase_with_two_processes(model_dir: Path, run: Path, out: Path) -> dict:
    """`launch_erasure` without FSDP with the `run`'s mask; returns the two-process run's metrics."""
    from erasure.io import read_json

    log = launch_erasure(model_dir, run, out, "--mask", run / "mask.safetensors")
    assert (out / "metrics.json").is_file(), log
    metrics = read_json(out / "metrics.json")
    assert metrics["processes"] == 2
    return metrics
