"""Shared fixtures: offline hub, a tiny Stable Diffusion pipeline on disk, and a CLI runner."""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SD pipeline saved once per session in diffusers format."""
    from pipelines.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd") / "pipeline")


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str]]:
    """Run `erasure <args>` in-process; returns (exit status, stdout + stderr)."""
    from erasure import cli

    def run(*args: str, commands: tuple[str, ...] = ("eval", "sample")) -> tuple[int, str]:
        # Only the commands under test are registered, so these tests do not depend on other commands' modules.
        monkeypatch.setattr(cli, "COMMANDS", tuple(c for c in cli.COMMANDS if c.path[0] in commands))
        capsys.readouterr()
        status = cli.main([str(a) for a in args])
        captured = capsys.readouterr()
        return status, captured.out + captured.err

    return run
