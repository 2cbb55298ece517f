"""`erasure sd` checks every input before generating anything, and prints no torchvision noise."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erasure.saliency import Mask

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sd_tiny.yaml"
SMALL_RUN = ("--config", TINY, "--grid-seeds", 0, "--steps", 1)


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make generating or encoding the forget/retain sets a test failure."""
    import pipelines.stable_diffusion as sd

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the forget/retain sets were generated before the inputs were checked")

    monkeypatch.setattr(sd, "encode_sets", refuse)


def test_a_corrupt_mask_fails_before_any_generation(run_cli, tiny_sd_dir, tmp_path, no_generation):
    mask = tmp_path / "mask.safetensors"
    mask.write_bytes(b"not a safetensors file")
    status, output = run_cli("sd", *SMALL_RUN, "--model", tiny_sd_dir, "--out", tmp_path / "run", "--mask", mask)
    assert status == 2 and "is not a readable safetensors file" in output
    assert not (tmp_path / "run").exists()  # nothing written: the corrected command can run with the same --out


def test_a_mask_of_another_model_fails_before_any_generation(run_cli, tiny_sd_dir, tmp_path, no_generation):
    mask = tmp_path / "mask.safetensors"
    Mask({"fc.weight": torch.ones(3, 2, dtype=torch.bool)}, {"model_class": "Linear"}).save(mask)
    status, output = run_cli("sd", *SMALL_RUN, "--model", tiny_sd_dir, "--out", tmp_path / "run", "--mask", mask)
    assert status == 2 and "made for another model" in output


def test_a_missing_mask_fails_before_any_generation(run_cli, tiny_sd_dir, tmp_path, no_generation):
    status, output = run_cli("sd", *SMALL_RUN, "--model", tiny_sd_dir, "--out", tmp_path / "run",
                             "--mask", tmp_path / "absent.safetensors")
    assert status == 2 and "does not exist" in output


@pytest.mark.slow  # a fresh process (10 s); the default suite reached its 300 s budget on CI
def test_sd_commands_print_no_torchvision_warning(tmp_path: Path) -> None:
    """In a fresh process: transformers warns once per process, so an in-process check could pass vacuously."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n")
    result = subprocess.run([sys.executable, str(REPO / "erase.py"), "sample", "--model", "tiny", "--prompts", prompts,
                             "--steps", "1", "--height", "32", "--width", "32", "--out", tmp_path / "samples"],
                            capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert "torchvision" not in result.stderr + result.stdout
