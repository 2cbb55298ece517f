"""FSDP through Accelerate's own config: a masked erasure under `accelerate launch --use_fsdp --fsdp_version 2`
saves what the same run saves without it. Accelerate enables FSDP only on accelerators, so this runs where CUDA
is (the GPU check); on CPU the mask engine's FSDP2 paths are tested with raw `fully_shard` in
test_saliency_sharded.py."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.launch import REPO, free_port
from test_sd_erase import erase_args, unet_state

from erasure.cli import main


@pytest.mark.gpu
def test_an_fsdp2_erasure_saves_the_weights_of_the_same_run_without_fsdp(tiny_sd_dir: Path, tmp_path: Path) -> None:
    flags = ["--steps", 2, "--lr", 1e-3, "--grid-seeds", 0, "--no-export-delta"]
    assert main(erase_args(tiny_sd_dir, tmp_path / "plain", *flags)) == 0
    command = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2",
               "--num_processes", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
               str(REPO / "erase.py"), *erase_args(tiny_sd_dir, tmp_path / "fsdp", *flags,
                                                  "--mask", tmp_path / "plain" / "mask.safetensors",
                                                  "--forget-images", tmp_path / "plain" / "data" / "forget",
                                                  "--retain-images", tmp_path / "plain" / "data" / "retain")]
    result = subprocess.run(command, env=os.environ | {"HF_HUB_OFFLINE": "1"}, cwd=REPO, capture_output=True,
                            text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    plain, fsdp = unet_state(tmp_path / "plain" / "unet"), unet_state(tmp_path / "fsdp" / "unet")
    for name, value in plain.items():
        torch.testing.assert_close(fsdp[name], value, rtol=1e-4, atol=1e-6, msg=name)
