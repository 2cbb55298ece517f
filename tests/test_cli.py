"""The command line as a user meets it: fast help, one-line errors, the quick start end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.launch import accelerate_launch, log_of

from erasure.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "erase.py"), *args], capture_output=True, text=True, cwd=cwd,
                          env=ENV, timeout=300)


def test_help_lists_every_subcommand_without_importing_heavy_packages():
    probe = ("import sys; from erasure.cli import build_parser; build_parser(); "
             "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'accelerate') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert result.stdout.strip() == "[]", result.stderr
    text = run_cli("--help").stdout
    for name in ("sd", "ddpm", "classifier", "mask", "eval", "sample"):
        assert name in text


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c.path))
def test_each_subcommand_help_shows_options_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command.path, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--config" in text and "default:" in text


def test_options_without_a_subcommand_mean_sd():
    args = vars(build_parser().parse_args(["sd", "--concept", "nudity"]))
    assert args["_command"].path == ("sd",)
    from erasure.cli import _normalise_argv

    assert _normalise_argv(["--concept", "nudity"]) == ["sd", "--concept", "nudity"]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.strip().splitlines() if line.startswith("erasure: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_missing_config_file(tmp_path):
    line = one_line_error(run_cli("classifier", "train", "--config", str(tmp_path / "missing.yaml")))
    assert "does not exist" in line and "--config" in line


def test_unknown_method():
    result = run_cli("classifier", "unlearn", "--original", "x", "--method", "unicorn")
    assert "must be one of" in one_line_error(result)


def test_missing_data_path(tmp_path):
    result = run_cli("classifier", "train", "--dataset", "cifar10", "--data-dir", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "out"))
    line = one_line_error(result)
    assert "cifar10_jpeg.npz" in line and "data_dir" in line


def test_quick_start_end_to_end_then_refuses_to_clobber(tmp_path, request):
    out = tmp_path / "quick"
    result = run_cli("classifier", "compare", "--config", "configs/classifier_digits.yaml", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "| salun |" in result.stdout and "Avg.Gap" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["methods"]["salun"]["UA"] > 50
    assert metrics["methods"]["retrain"]["UA"] > 90
    assert (out / "report.md").is_file() and (out / "manifest.json").is_file()
    # The follow-up commands run in-process (the entry point is the quick start's; each subprocess costs seconds).
    run_cli_here = request.getfixturevalue("run_cli")
    status, text = run_cli_here("classifier", "compare", "--config", "configs/classifier_digits.yaml", "--out", out)
    assert status != 0 and "already holds a finished run" in text

    mask_file = tmp_path / "mask.safetensors"
    status, text = run_cli_here("mask", "compute", "--original", out / "original", "--forget", "class:3",
                                "--ratio", "0.2", "--out", mask_file, "--packed")
    assert status == 0, text
    status, text = run_cli_here("mask", "show", "--path", mask_file)
    assert status == 0 and '"ratio": 0.2' in text and "total" in text
    status, text = run_cli_here("mask", "compute", "--original", out / "original", "--out", mask_file)
    assert status != 0 and "already exists" in text


@pytest.mark.slow  # the default suite ran 373 s of its 300 s budget
def test_a_mask_for_another_model_is_refused(tmp_path):
    import torch

    from erasure.saliency import Mask

    Mask({"conv.weight": torch.ones(3, 3, dtype=torch.bool)}, {"model_class": "Other"}).save(tmp_path / "m.safetensors")
    Mask({"head.weight": torch.ones(3, 3, dtype=torch.bool), "conv.weight": torch.ones(2, dtype=torch.bool)},
         {"model_class": "Other"}).save(tmp_path / "partial.safetensors")
    original = tmp_path / "original"
    assert run_cli("classifier", "train", "--epochs", "1", "--out", str(original)).returncode == 0
    result = run_cli("classifier", "unlearn", "--original", str(original), "--method", "salun",
                     "--mask", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "u"))
    assert "another model" in one_line_error(result)
    result = run_cli("classifier", "unlearn", "--original", str(original), "--method", "salun",
                     "--mask", str(tmp_path / "partial.safetensors"), "--out", str(tmp_path / "v"))
    line = one_line_error(result)
    assert "head.weight" in line and "(3, 3)" in line and "conv.weight" in line


@pytest.mark.slow  # the default suite ran 324 s of its 300 s budget
def test_two_cpu_processes_under_accelerate_launch_train_like_one(tmp_path):
    from classifiers.models import load_model

    result = accelerate_launch(ROOT / "erase.py", "classifier", "train", "--epochs", "3", "--batch-size", "64",
                               "--out", tmp_path / "two")
    assert (tmp_path / "two" / "model.safetensors").is_file(), log_of(result)
    assert result.stdout.count("trained mlp") == 1, result.stdout
    assert run_cli("classifier", "train", "--epochs", "3", "--out", str(tmp_path / "one")).returncode == 0
    two = load_model(tmp_path / "two" / "model.safetensors").state_dict()
    one = load_model(tmp_path / "one" / "model.safetensors").state_dict()
    assert all(torch_allclose(two[k], one[k]) for k in one)


def torch_allclose(a, b) -> bool:
    import torch

    return torch.allclose(a, b, atol=1e-2, rtol=0)
