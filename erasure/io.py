"""Run directories: atomic writes, the guard against clobbering a finished run, manifests, checkpoints.

Every run writes `manifest.json` (resolved config, package versions, git commit, seed, device,
start/end time, wall seconds, status) and `metrics.json`. A directory whose manifest says
`finished` is refused unless `overwrite=True`; an unfinished one is refused unless the run is
resumed (`resume=True`) or overwritten.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from erasure.errors import RunDirError

MANIFEST = "manifest.json"
METRICS = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
TRACKED_PACKAGES = ("erasure", "torch", "diffusers", "transformers", "accelerate", "safetensors",
                    "numpy", "scikit-learn", "nudenet", "torchmetrics")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Open a temp file beside `path`; on success it replaces `path` in one step, on error it vanishes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_path(path: str | Path) -> contextlib.AbstractContextManager[Path]:
    """A temp path beside `path` for writers that need a file name (safetensors, torch.save, PIL)."""

    @contextlib.contextmanager
    def manager() -> Iterator[Path]:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
        try:
            yield Path(tmp)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    return manager()


DATA_DIR_ENV = "ERASURE_DATA_DIR"
DEFAULT_DATA_DIR = "../shared/data"


def data_dir(configured: str | None = None) -> Path:
    """The shared data folder (CIFAR-10, prompts): the config value, else $ERASURE_DATA_DIR, else ../shared/data."""
    return Path(configured or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temp folder beside `path` to write into (e.g. `save_pretrained`); on success it replaces `path`.

    The old folder is moved aside before the new one is renamed in and removed afterwards, so a crash
    leaves either the old or the new folder at `path`, never a half-written one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield tmp
        old = target.with_name(f".{target.name}.{os.getpid()}.old")
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON atomically (sorted keys are not forced: insertion order reads better)."""
    with atomic_open(path, "w") as handle:
        json.dump(data, handle, indent=2, default=_json_default)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file."""
    return json.loads(Path(path).read_text())


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages a result depends on."""
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return versions


def cpu_threads() -> int | None:
    """torch's intra-op CPU threads (they change the order of float reductions, hence a CPU run's last bits), or None
    when torch is not loaded."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the source tree (with `-dirty` if it has uncommitted changes), or None."""
    cwd = Path(path) if path else Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class RunDir:
    """An output directory of one run: guards, manifest, metrics and checkpoints.

    `RunDir(path, overwrite=..., resume=...)` checks the directory; `start(config, seed, device)`
    writes the manifest with status `running`; `finish(metrics)` writes `metrics.json` and marks
    the manifest `finished` with the end time and wall seconds. `reopen=True` lets `resume` continue a
    finished run too: for runs that collect other runs (a comparison, a benchmark), which a resume extends
    with rows while reusing the finished ones.
    """

    def __init__(self, path: str | Path, *, overwrite: bool = False, resume: bool = False, main_process: bool = True,
                 reopen: bool = False):
        self.path = Path(path)
        self.main_process = main_process
        self.resumed = resume
        if main_process:
            self._guard(overwrite=overwrite, resume=resume, reopen=reopen)
        self._t0 = time.time()
        self._manifest: dict[str, Any] = {}

    def _guard(self, *, overwrite: bool, resume: bool, reopen: bool) -> None:
        state = self.status()
        if state == "finished" and not overwrite and not (resume and reopen):
            raise RunDirError(
                f"output directory '{self.path}' already holds a finished run; "
                + ("pass --resume to add to it, " if reopen else "")
                + "pass --overwrite to replace it or choose another --out"
            )
        if state is not None and state != "finished" and not (resume or overwrite):
            raise RunDirError(
                f"output directory '{self.path}' holds an unfinished run; "
                "pass --resume to continue it or --overwrite to start again"
            )
        if state is None and self.path.is_dir() and any(self.path.iterdir()) and not overwrite:
            raise RunDirError(
                f"output directory '{self.path}' exists and is not empty; "
                "choose another --out or pass --overwrite to replace it"
            )
        if overwrite and self.path.exists():
            shutil.rmtree(self.path)
        self.resumed = resume and not overwrite and state is not None and (state != "finished" or reopen)

    def status(self) -> str | None:
        """The manifest's status (`running`, `failed`, `finished`), or None when there is no manifest."""
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            return None
        try:
            return read_json(manifest).get("status", "running")
        except (json.JSONDecodeError, OSError):
            return "running"

    @property
    def checkpoints(self) -> Path:
        """The folder of resumable state."""
        return self.path / CHECKPOINT_DIR

    def start(self, config: dict[str, Any], *, seed: int | None, device: str, kind: str,
              protocol: dict[str, Any] | None = None) -> None:
        """Write the manifest of a run that is starting (or resuming); evaluations name their `protocol`."""
        manifest = self.path / MANIFEST
        previous = read_json(manifest) if self.resumed and manifest.is_file() else {}
        self._manifest = {
            "kind": kind,
            **({"protocol": protocol} if protocol else {}),
            "status": "running",
            "config": config,
            "seed": seed,
            "device": device,
            "cpu_threads": cpu_threads(),
            "versions": package_versions(),
            "git_commit": git_commit(),
            "command": sys.argv,
            "started": previous.get("started", _now()),
            "resumed_at": [*previous.get("resumed_at", []), _now()] if self.resumed else [],
        }
        self._write_manifest()

    def fail(self, reason: str) -> None:
        """Mark the run failed; its checkpoints stay so it can be resumed."""
        self._manifest.update(status="failed", failure=reason, ended=_now())
        self._write_manifest()

    def finish(self, metrics: dict[str, Any], *, keep_checkpoints: bool = False) -> None:
        """Write metrics.json and mark the manifest finished."""
        if not self.main_process:
            return
        write_json(self.path / METRICS, metrics)
        self._manifest.update(status="finished", ended=_now(), wall_seconds=round(time.time() - self._t0, 3),
                              metrics=metrics)
        self._write_manifest()
        if not keep_checkpoints and self.checkpoints.exists():
            shutil.rmtree(self.checkpoints)

    def _write_manifest(self) -> None:
        if self.main_process:
            write_json(self.path / MANIFEST, self._manifest)


def finished_manifest(path: str | Path) -> dict[str, Any] | None:
    """The manifest of a finished run at `path`, or None when there is none (no manifest, or not finished)."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        return None
    data = read_json(manifest)
    return data if data.get("status") == "finished" else None


def changed_settings(recorded: dict[str, Any], wanted: dict[str, Any], ignored: tuple[str, ...] = (), *,
                     unrecorded_changed: bool = False) -> list[str]:
    """The keys of `wanted` (a resolved config as plain data) whose values differ from those in `recorded` (a
    manifest's config); keys in `ignored` are not compared, nor keys `recorded` lacks (settings added since it was
    made) unless `unrecorded_changed`."""
    wanted = json.loads(json.dumps(wanted, default=str))
    return sorted(k for k in wanted if k not in ignored and (k in recorded or unrecorded_changed)
                  and recorded.get(k) != wanted[k])


def check_resumable(out: str | Path, settings: dict[str, Any], resumable: tuple[str, ...]) -> None:
    """Refuse to resume `out` when a setting outside `resumable` differs from the one its manifest records."""
    previous = read_json(Path(out) / MANIFEST).get("config", {})
    changed = changed_settings(previous, settings, resumable)
    if changed:
        details = ", ".join(f"{k}: {previous[k]!r} -> {settings[k]!r}" for k in changed)
        raise RunDirError(f"cannot resume '{out}' with different settings ({details}); "
                          "use the original settings, or --overwrite / another --out to start again")


def reusable_run(path: str | Path, wanted: dict[str, Any], *, ignored: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """The manifest of the finished run at `path` if it was made with the settings `wanted`, None when `path` holds
    no finished run, or a RunDirError naming the settings that differ, so a changed setting never silently reuses
    an old result. Keys in `ignored` (how it ran, where it wrote) are not compared; a setting the run did not
    record counts as changed, since it may have been made without it."""
    manifest = finished_manifest(path)
    if manifest is None:
        return None
    changed = changed_settings(manifest.get("config", {}), wanted, ignored, unrecorded_changed=True)
    if changed:
        raise RunDirError(f"'{path}' holds a finished run made with other settings ({', '.join(changed)}); "
                          "remove that folder (or pass --overwrite) to run it again, or choose another --out")
    return manifest


def finished_run(path: str | Path, what: str) -> dict[str, Any]:
    """The manifest of a finished run at `path`, or a RunDirError saying what to do instead."""
    manifest = Path(path) / MANIFEST
    if not manifest.is_file():
        raise RunDirError(f"'{path}' is not a run directory (no {MANIFEST}); pass the --out folder of a {what} run")
    data = read_json(manifest)
    if data.get("status") != "finished":
        raise RunDirError(f"the {what} run in '{path}' has not finished; resume it with --resume first")
    return data
