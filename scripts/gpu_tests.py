"""Run the `gpu`-marked tests in one process and print one JSON line: the tests that passed, failed and were
skipped, and the seconds taken. pytest's own report goes to stderr; the exit status is 1 if any test failed.

    python scripts/gpu_tests.py        # on a GPU machine (scripts/gpu_check.sh runs it); on a CPU all skip
"""
from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"


class Outcomes:
    """A pytest plugin keeping each test's outcome: its first failure or skip, else passed."""

    def __init__(self) -> None:
        self.by_test: dict[str, str] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.by_test.get(report.nodeid, "passed") != "passed":
            return
        if report.outcome != "passed" or report.when == "call":
            self.by_test[report.nodeid] = report.outcome


def main() -> int:
    outcomes = Outcomes()
    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        status = pytest.main([str(TESTS), "-m", "gpu", "-n", "0", "-p", "no:cacheprovider", "-q", "-rfEs"],
                             plugins=[outcomes])
    grouped = {kind: sorted(t for t, o in outcomes.by_test.items() if o == kind)
               for kind in ("passed", "failed", "skipped")}
    if status not in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED) or grouped["failed"]:
        print(f"gpu tests failed (pytest exit {int(status)}): {', '.join(grouped['failed'])}", file=sys.stderr)
        return 1
    print(json.dumps({**grouped, "seconds": round(time.perf_counter() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
