"""Reports of evaluation protocols: `report.md` (protocol, settings, tables) and image grids.

metrics.json and manifest.json come from `erasure.io.RunDir.finish`; this module writes the human
side. Grids can be redacted: flagged images are pixelated to 8x8 blocks and framed in red, so a
report on nudity can be shared without showing what the detector found.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from erasure.io import atomic_open, atomic_path

PIXEL_BLOCKS = 8
FLAG_COLOUR = (220, 30, 30)


@dataclass(frozen=True)
class Protocol:
    """A named, versioned evaluation protocol; its id (e.g. `nudity-i2p-v1`) goes into every output."""

    name: str
    version: int
    summary: str

    @property
    def id(self) -> str:
        """`<name>-v<version>`."""
        return f"{self.name}-v{self.version}"


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


def pixelate(image: np.ndarray, blocks: int = PIXEL_BLOCKS) -> np.ndarray:
    """The image reduced to blocks x blocks cells and scaled back (nothing recognisable survives)."""
    height, width = image.shape[:2]
    small = Image.fromarray(image).resize((blocks, blocks), Image.Resampling.BOX)
    return np.asarray(small.resize((width, height), Image.Resampling.NEAREST))


def image_grid(images: Sequence[np.ndarray], *, flagged: Sequence[bool] | None = None, redact: bool = False,
               columns: int = 8, cell: int = 128) -> Image.Image:
    """uint8 RGB HWC images tiled into one picture; flagged ones framed in red and, with `redact`, pixelated."""
    if not images:
        raise ValueError("an image grid needs at least one image")
    flagged = list(flagged) if flagged is not None else [False] * len(images)
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * cell, rows * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for index, (image, flag) in enumerate(zip(images, flagged)):
        if redact and flag:
            image = pixelate(image)
        tile = Image.fromarray(image).resize((cell, cell), Image.Resampling.BICUBIC)
        x, y = (index % columns) * cell, (index // columns) * cell
        grid.paste(tile, (x, y))
        if flag:
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=FLAG_COLOUR, width=3)
    return grid


def grid_links(grids: Sequence[tuple[str, str]]) -> str:
    """Markdown that shows each (caption, grid file) pair."""
    return "\n\n".join(f"{caption}:\n\n![{caption}]({file})" for caption, file in grids)


def save_png(path: str | Path, image: Image.Image | np.ndarray) -> Path:
    """Write a PIL image or a uint8 RGB HWC array as a PNG, atomically (temp file, then rename)."""
    picture = image if isinstance(image, Image.Image) else Image.fromarray(image)
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")
    return Path(path)


def write_report(path: str | Path, protocol: Protocol, sections: Sequence[tuple[str, str]]) -> Path:
    """Write report.md: a title naming the protocol, then each (heading, markdown body) section."""
    parts = [f"# {protocol.summary}", "",
             f"Protocol: `{protocol.id}` (name `{protocol.name}`, version {protocol.version})", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    with atomic_open(path, "wb") as handle:
        handle.write("\n".join(parts).encode("utf-8"))
    return Path(path)
