"""Error types. Every user-facing problem is a :class:`FedsimError`: the CLI prints its message on one
line and exits with code 2, without a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class FedsimError(ValueError):
    """A problem with the user's input (unknown name, bad value, missing file or data source)."""


class DataSourceMissing(FedsimError):
    """An offline data source is not installed; the message says what to install."""


class FedsimWarning(UserWarning):
    """Input that runs but probably not as meant; the CLI prints it as one ``warning:`` line."""


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by SIGINT or SIGTERM after keeping what it wrote (``summary.json`` says
    ``"interrupted": true``); the message says how to resume. Still a ``KeyboardInterrupt`` for callers."""


class DivergenceError(RuntimeError):
    """Training produced a non-finite loss or parameters."""


class OutOfMemory(RuntimeError):
    """A round ran out of (GPU or host) memory; the message says what to change. Exit code 3, like a
    divergence: what was written is kept."""


def did_you_mean(value: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean 'x'?)' for the closest choice, or '' when nothing is close."""
    match = difflib.get_close_matches(value, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""


def unknown(kind: str, value: str, choices: Iterable[str]) -> FedsimError:
    """Build the standard 'unknown X' error listing the valid choices."""
    choices = sorted(choices)
    return FedsimError(f"unknown {kind} {value!r}{did_you_mean(value, choices)}; choose from: {', '.join(choices)}")
