"""Evaluation protocols behind one interface, and the one runner that gives them a run directory and a report.

A protocol (the shape of an lm-evaluation-harness task) has a name, a version and a summary (its
`ProtocolCard`), computes metrics from its inputs and says how its report reads. The runner does what
every protocol shares: it claims the output directory (refusing a finished one without --overwrite),
records the protocol's id and version in manifest.json, saves the grids the protocol asks for, writes
report.md and metrics.json, and finishes the run. A new protocol is one module that subclasses
`Protocol` and calls `register`; a domain protocol (pipelines) plugs in the same way, and the classifier
metrics carry a `ProtocolCard` and the same report writer.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from erasure.errors import ErasureError
from erasure.evaluation.report import write_report
from erasure.io import RunDir
from erasure.media import image_grid, save_png

REPORT = "report.md"


@dataclass(frozen=True)
class ProtocolCard:
    """A protocol's identity; its id (e.g. `nudity-i2p-v1`) goes into every output."""

    name: str
    version: int
    summary: str

    @property
    def id(self) -> str:
        """`<name>-v<version>`."""
        return f"{self.name}-v{self.version}"

    def stamp(self) -> dict[str, Any]:
        """What metrics.json and manifest.json record about the protocol."""
        return {"protocol": self.id, "protocol_version": self.version}


@dataclass
class Grid:
    """Images the report shows as one grid (`grid_<caption>.png`); flagged ones framed, and pixelated if redacted."""

    caption: str
    images: Sequence[np.ndarray]
    flagged: Sequence[bool] | None = None
    redact: bool = False
    columns: int = 8
    cell: int = 128

    @property
    def file(self) -> str:
        return f"grid_{self.caption}.png"


@dataclass
class Result:
    """What a protocol computed: its metrics, the grids to show and a one-line console summary."""

    metrics: dict[str, Any]
    line: str
    grids: list[Grid] = field(default_factory=list)


class Protocol(ABC):
    """One evaluation protocol: `compute(inputs, out) -> Result` and the report sections of its metrics."""

    card: ClassVar[ProtocolCard]
    kind: ClassVar[str]  # the manifest's run kind, e.g. `eval-nudity`

    @abstractmethod
    def compute(self, inputs: Any, out: Path) -> Result:
        """Metrics (and grids) from the inputs; `out` is the claimed run directory for side files."""

    @abstractmethod
    def report_sections(self, metrics: dict[str, Any], grids: list[tuple[str, str]]) -> list[tuple[str, str]]:
        """report.md's (heading, markdown) sections; `grids` are (caption, file) pairs already saved."""


PROTOCOLS: dict[str, Protocol] = {}


def register(protocol: Protocol) -> Protocol:
    """Add a protocol to the registry under its id (refusing a second protocol with the same id)."""
    existing = PROTOCOLS.get(protocol.card.id)
    if existing is not None and type(existing) is not type(protocol):
        raise ErasureError(f"protocol id '{protocol.card.id}' is registered twice; give the new one another "
                           "name or version")
    PROTOCOLS[protocol.card.id] = protocol
    return protocol


def run_protocol(protocol: Protocol, inputs: Callable[[Path], Any], *, out: str | Path, config: dict[str, Any],
                 seed: int | None, device: str, overwrite: bool = False, resume: bool = False) -> dict[str, Any]:
    """Claim `out`, gather the inputs (they may be written there, e.g. samples), compute, report, finish.

    Returns the metrics as written to metrics.json (the protocol's id and version first).
    """
    out = Path(out)
    run = RunDir(out, overwrite=overwrite, resume=resume)
    run.start(config, seed=seed, device=device, kind=protocol.kind, protocol=protocol.card.stamp())
    result = protocol.compute(inputs(out), out)
    grids = []
    for grid in result.grids:
        picture = image_grid(list(grid.images), flagged=grid.flagged, redact=grid.redact, columns=grid.columns,
                             cell=grid.cell)
        save_png(out / grid.file, picture)
        grids.append((grid.caption, grid.file))
    metrics = {**protocol.card.stamp(), **result.metrics}
    write_report(out / REPORT, protocol.card, protocol.report_sections(metrics, grids))
    run.finish(metrics)
    print(f"{protocol.card.id}: {result.line}; report in {out / REPORT}")
    return metrics
