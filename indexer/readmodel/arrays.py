"""A batch's columns as Postgres array literals, one text parameter per column.

psycopg dumps a Python list element by element in Python (``ListDumper``), which was the largest
single cost of draining a backlog (bench/drain.py, py-spy: ~30 µs an event).  The elements of a
batch are of four known types, so each column is written here as the literal ``array_in`` reads,
with one ``join`` over C-level conversions, and passed untyped (``%s::bigint[]`` in the SQL):
Postgres parses it as the array type the statement casts it to.

Elements are written so that no quoting is ever needed beyond the bytea escape: integers and
ISO 8601 timestamps contain no character that ``array_in`` treats specially.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime


def bigints(values: Iterable[int | None]) -> str:
    """``{1,2,NULL}``; a value beyond bigint is refused by Postgres (a DataError), as before."""
    return "{" + ",".join(["NULL" if v is None else str(int(v)) for v in values]) + "}"


def byteas(values: Iterable[bytes]) -> str:
    r"""``{"\\x0102","\\x"}``: the hex form, its backslash escaped for the array parser."""
    return "{" + ",".join(['"\\\\x' + v.hex() + '"' for v in values]) + "}"


def timestamptzs(values: Iterable[datetime | None]) -> str:
    """``{2026-12-01T10:00:00.123456+00:00,NULL}``; aware values keep their offset, so the session's
    time zone plays no part (a naive one would be read in it, as psycopg's own dumper does)."""
    return "{" + ",".join(["NULL" if v is None else v.isoformat() for v in values]) + "}"
