"""Test helpers for the read model: read the table back, and compute the table the SPEC expects."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta, timezone
from typing import NamedTuple

import psycopg
from psycopg import sql

from indexer.changes import Change, Kind, version_key


class Row(NamedTuple):
    """The columns that must converge (``updated_at`` and ``previous_organization_id`` depend on
    the delivery order by design)."""

    organization_id: int
    mention_date: datetime | None
    transaction_timestamp: datetime
    change_kind: int
    deleted: bool


def read_table(url: str, schema: str) -> dict[int, Row]:
    query = sql.SQL(
        "SELECT mention_id, organization_id, mention_date, transaction_timestamp, change_kind, deleted"
        " FROM {} ORDER BY mention_id"
    ).format(sql.Identifier(schema, "mentions"))
    with psycopg.connect(url) as conn:
        return {mention_id: Row(*rest) for mention_id, *rest in conn.execute(query)}


def read_row(url: str, schema: str, mention_id: int) -> dict[str, object] | None:
    """Every column of one row, for tests that look at the bookkeeping columns too."""
    query = sql.SQL("SELECT * FROM {} WHERE mention_id = %s").format(sql.Identifier(schema, "mentions"))
    with psycopg.connect(url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(query, (mention_id,)).fetchone()


def truncate(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(schema, "mentions")))


def oracle(changes: Iterable[Change]) -> dict[int, Row]:
    """The table SPEC §6 prescribes, by its definition: every change applied in version order,
    each replacing the row but leaving the fields it does not carry (organization None or 0,
    mention_date None) as they were.  Deliberately not the store's algorithm (registers)."""
    table: dict[int, Row] = {}
    for c in sorted(changes, key=version_key):
        current = table.get(c.mention_id)
        organization_id = c.organization_id or (current.organization_id if current else 0)
        mention_date = c.mention_date if c.mention_date is not None else (current.mention_date if current else None)
        table[c.mention_id] = Row(organization_id, mention_date, c.transaction_timestamp, int(c.kind), c.deleted)
    return dict(sorted(table.items()))


T0 = datetime(2024, 1, 1, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    """A timestamp ``seconds`` after a fixed origin; keeps test histories readable."""
    return T0 + timedelta(seconds=seconds)


def change(
    kind: Kind,
    mention_id: int,
    organization_id: int | None,
    ts_s: float,
    date_s: float | None = 0,
) -> Change:
    """A Change with its timestamps given as seconds after ``T0``."""
    return Change(
        kind=kind,
        mention_id=mention_id,
        organization_id=organization_id,
        mention_date=None if date_s is None else at(date_s),
        transaction_timestamp=at(ts_s),
    )
