"""User-facing errors: each names the problem and the fix, and the CLI prints it as one line."""
from __future__ import annotations


class ErasureError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""


class ConfigError(ErasureError):
    """A config file or flag is missing, unknown, mistyped or out of range."""


class MaskError(ErasureError):
    """A mask cannot be built, or does not fit the model it is applied to."""


class RunDirError(ErasureError):
    """An output directory cannot be used as asked (e.g. it holds a finished run)."""


class NonFiniteLossError(ErasureError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters), to quote inside a one-line error."""
    lines = str(exc).strip().splitlines()
    return lines[0][:limit] if lines else type(exc).__name__
