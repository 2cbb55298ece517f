"""The protocol runner: one run directory, manifest, grids, report.md and metrics.json for every protocol."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from erasure.errors import ErasureError, RunDirError
from erasure.evaluation.protocol import PROTOCOLS, Grid, Protocol, ProtocolCard, Result, register, run_protocol
from erasure.evaluation.report import markdown_table


class CountingProtocol(Protocol):
    """A toy protocol: the mean of its inputs, and a grid of grey squares as bright as each input."""

    card = ProtocolCard("toy-mean", 3, "Toy protocol: the mean of some numbers")
    kind = "eval-toy"

    def compute(self, inputs: list[float], out: Path) -> Result:
        (out / "side.txt").write_text("written by the protocol")
        squares = [np.full((4, 4, 3), int(v), dtype=np.uint8) for v in inputs]
        return Result({"mean": sum(inputs) / len(inputs)}, f"mean {sum(inputs) / len(inputs)}",
                      [Grid("inputs", squares)])

    def report_sections(self, metrics: dict[str, Any], grids: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return [("Result", markdown_table(["metric", "value"], [("mean", metrics["mean"])])),
                ("Grids", ", ".join(file for _, file in grids))]


@pytest.fixture(scope="module")
def toy() -> Iterator[Protocol]:
    protocol = register(CountingProtocol())
    yield protocol
    PROTOCOLS.pop(protocol.card.id)


def test_runner_writes_manifest_metrics_report_and_grids(toy, tmp_path):
    assert PROTOCOLS["toy-mean-v3"] is toy
    out = tmp_path / "eval"
    metrics = run_protocol(toy, lambda folder: [10.0, 20.0, 60.0], out=out, config={"numbers": 3}, seed=7,
                           device="cpu")
    assert metrics == {"protocol": "toy-mean-v3", "protocol_version": 3, "mean": 30.0}
    assert json.loads((out / "metrics.json").read_text()) == metrics
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "finished" and manifest["kind"] == "eval-toy" and manifest["seed"] == 7
    assert manifest["protocol"] == {"protocol": "toy-mean-v3", "protocol_version": 3}
    assert manifest["config"] == {"numbers": 3}
    report = (out / "report.md").read_text()
    assert report.startswith("# Toy protocol: the mean of some numbers")
    assert "`toy-mean-v3`" in report and "| mean | 30 |" in report and "grid_inputs.png" in report
    assert (out / "grid_inputs.png").is_file() and (out / "side.txt").is_file()


def test_inputs_are_gathered_after_the_directory_is_claimed(toy, tmp_path):
    out = tmp_path / "eval"
    seen = []

    def gather(folder: Path) -> list[float]:
        seen.append(json.loads((folder / "manifest.json").read_text())["status"])
        return [1.0]

    run_protocol(toy, gather, out=out, config={}, seed=None, device="cpu")
    assert seen == ["running"]


def test_a_finished_directory_is_refused_without_overwrite(toy, tmp_path):
    out = tmp_path / "eval"
    run_protocol(toy, lambda _: [1.0], out=out, config={}, seed=None, device="cpu")
    with pytest.raises(RunDirError, match="--overwrite"):
        run_protocol(toy, lambda _: [5.0], out=out, config={}, seed=None, device="cpu")
    assert json.loads((out / "metrics.json").read_text())["mean"] == 1.0
    run_protocol(toy, lambda _: [5.0], out=out, config={}, seed=None, device="cpu", overwrite=True)
    assert json.loads((out / "metrics.json").read_text())["mean"] == 5.0


def test_two_protocols_cannot_share_an_id(toy):
    class Impostor(CountingProtocol):
        pass

    with pytest.raises(ErasureError, match="toy-mean-v3"):
        register(Impostor())


def test_every_shipped_protocol_registers_under_its_id():
    import erasure.evaluation.fid  # noqa: F401
    import erasure.evaluation.nudity  # noqa: F401
    import pipelines.ddpm_eval  # noqa: F401

    assert {"nudity-i2p-v1", "retain-fid-v1", "ddpm-cifar10-v1"} <= set(PROTOCOLS)
    assert all(protocol.card.id == key for key, protocol in PROTOCOLS.items())
