"""Reports of evaluation protocols: `report.md` (protocol, settings, tables, links to grids).

metrics.json and manifest.json come from `erasure.io.RunDir.finish`; this module writes the human
side. The grids themselves are drawn by `erasure.media.image_grid`.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from erasure.io import atomic_open

if TYPE_CHECKING:
    from erasure.evaluation.protocol import ProtocolCard


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; floats get 4 significant digits, None shows as '-'."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, headers)) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def settings_table(settings: dict[str, Any]) -> str:
    """A two-column table of every setting; nested mappings become dotted keys (`detector.version`)."""
    return markdown_table(["setting", "value"], list(_flatten(settings)))


def _flatten(settings: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        elif isinstance(value, (list, tuple)):
            yield f"{prefix}{key}", ", ".join(map(str, value)) or "-"
        else:
            yield f"{prefix}{key}", value


def grid_links(grids: Sequence[tuple[str, str]]) -> str:
    """Markdown that shows each (caption, grid file) pair."""
    return "\n\n".join(f"{caption}:\n\n![{caption}]({file})" for caption, file in grids)


def write_report(path: str | Path, protocol: ProtocolCard, sections: Sequence[tuple[str, str]]) -> Path:
    """Write report.md: a title naming the protocol, then each (heading, markdown body) section."""
    parts = [f"# {protocol.summary}", "",
             f"Protocol: `{protocol.id}` (name `{protocol.name}`, version {protocol.version})", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    with atomic_open(path, "wb") as handle:
        handle.write("\n".join(parts).encode("utf-8"))
    return Path(path)
