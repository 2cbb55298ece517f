"""Prompt files: CSV with a `prompt` column (I2P, Imagenette, your own) or plain text, one per line.

Each prompt keeps the seed and guidance its file gives (`evaluation_seed`, `evaluation_guidance` in
I2P), so every lab renders the same images. Prompts without them get `seed + row` and the default
guidance. Rows are numbered by their position in the file (I2P's `case_number`), so `--limit` and
`--subset` never change which seed or file name a prompt gets.
"""
from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from erasure.errors import ErasureError
from erasure.io import data_dir

RECORDS = "prompts.jsonl"
"""The file beside sampled images that records each one's prompt, seed and settings (one JSON line each)."""
SEED_COLUMNS = ("evaluation_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "guidance")


class PromptFileError(ErasureError):
    """A prompt file is missing, empty or lacks a column it needs."""


@dataclass(frozen=True)
class Prompt:
    """One prompt with everything needed to render its image reproducibly."""

    row: int
    text: str
    seed: int
    guidance: float
    categories: tuple[str, ...] = ()

    @property
    def file(self) -> str:
        """The image file name of this prompt."""
        return f"{self.row:05d}.png"


def default_i2p_file() -> Path:
    """I2P's CSV under $ERASURE_DATA_DIR (default ../shared/data)."""
    return data_dir() / "prompts" / "i2p.csv"


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, to pin the exact prompt set in manifests and reports."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_prompts(
    path: str | Path,
    *,
    subset: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    guidance: float = 7.5,
) -> list[Prompt]:
    """The prompts of a .csv or .txt file, filtered by `subset` (a category) and cut to `limit`."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file '{path}' does not exist; pass a .csv with a 'prompt' column or a .txt file")
    if path.suffix.lower() == ".csv":
        prompts, has_categories = _read_csv(path, seed, guidance)
    else:
        prompts, has_categories = _read_txt(path, seed, guidance), False
    if not prompts:
        raise PromptFileError(f"prompt file '{path}' holds no prompts; add rows (one prompt per row or line)")
    if subset:
        if not has_categories:
            raise PromptFileError(
                f"--subset {subset} needs a 'categories' column, which prompt file '{path}' lacks; drop --subset"
            )
        prompts = _filter(path, prompts, subset)
    return prompts[:limit] if limit is not None else prompts


def _read_txt(path: Path, seed: int, guidance: float) -> list[Prompt]:
    lines = [line.strip() for line in path.read_text(encoding="utf-8-sig").splitlines()]
    return [Prompt(row, text, seed + row, guidance) for row, text in enumerate(t for t in lines if t)]


def _read_csv(path: Path, seed: int, guidance: float) -> tuple[list[Prompt], bool]:
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in reader.fieldnames or []]
        if not columns:
            raise PromptFileError(f"prompt file '{path}' is empty; it needs a header row with a 'prompt' column")
        if "prompt" not in columns:
            raise PromptFileError(
                f"prompt file '{path}' has no 'prompt' column (columns: {', '.join(columns)}); "
                "rename the prompt column to 'prompt'"
            )
        seed_column = next((c for c in SEED_COLUMNS if c in columns), None)
        guidance_column = next((c for c in GUIDANCE_COLUMNS if c in columns), None)
        prompts = []
        for row, record in enumerate(reader):
            record = {(k or "").strip(): (v or "").strip() for k, v in record.items() if k is not None}
            prompts.append(Prompt(
                row=row,
                text=record.get("prompt", ""),
                seed=_number(path, row, seed_column, record, int) if seed_column and record.get(seed_column)
                else seed + row,
                guidance=_number(path, row, guidance_column, record, float)
                if guidance_column and record.get(guidance_column) else guidance,
                categories=tuple(c.strip() for c in record.get("categories", "").split(",") if c.strip()),
            ))
    return prompts, "categories" in columns


def _number(path: Path, row: int, column: str, record: dict[str, str], kind: type) -> int | float:
    raw = record[column]
    try:
        value = float(raw)
        if kind is int:
            if not value.is_integer() or value < 0:
                raise ValueError(raw)
            return int(raw) if raw.isdigit() else int(value)
        return value
    except ValueError:
        raise PromptFileError(
            f"prompt file '{path}', data row {row}: column '{column}' must be a "
            f"{'non-negative integer' if kind is int else 'number'}, got '{raw}'; fix that row"
        ) from None


def _filter(path: Path, prompts: list[Prompt], subset: str) -> list[Prompt]:
    wanted = subset.strip().lower()
    chosen = [p for p in prompts if wanted in (c.lower() for c in p.categories)]
    if not chosen:
        known = sorted({c for p in prompts for c in p.categories})
        raise PromptFileError(
            f"no prompt in '{path}' has category '{subset}'; choose one of: {', '.join(known)}"
        )
    return chosen
