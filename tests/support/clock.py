"""The tests' clock: instants as seconds after a fixed origin ``T0``, so histories read as small
numbers, and ``utc(...)`` for an instant written out.  Nothing here imports ``indexer``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

UTC = timezone.utc
T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    """The instant ``seconds`` after ``T0``."""
    return T0 + timedelta(seconds=seconds)


def utc(*fields: int) -> datetime:
    """``datetime(*fields)`` in UTC: ``utc(2006, 1, 2, 15, 4, 5)``."""
    return datetime(*fields, tzinfo=UTC)  # type: ignore[misc]
