"""Errors that the CLI reports as one clear line (no traceback) with a non-zero exit."""

from __future__ import annotations


class SteerableError(Exception):
    """Base class of every error caused by the user's input rather than by a bug."""


class DataError(SteerableError, ValueError):
    """A preference file or dataset is malformed.

    The message names the source, the row (``line N`` for JSON Lines, ``row N`` for tables, 1-based)
    and the field, e.g. ``prefs.jsonl: line 3: field 'chosen': 2 values, expected 4``.
    """

    def __init__(
        self, message: str, *, source: str | None = None, row: str | None = None, field: str | None = None
    ) -> None:
        self.source, self.row, self.field, self.reason = source, row, field, message
        parts = [p for p in (source, row, f"field '{field}'" if field else None) if p]
        super().__init__(": ".join([*parts, message]))


class ConfigError(SteerableError, ValueError):
    """A configuration value is invalid or contradicts an existing run."""
