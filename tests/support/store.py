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
    """The table SPEC §6 prescribes: per mention, the change with the highest version.

    Valid for changes that carry every field (organization and date); a change that omits one is
    merged with whatever is stored, which depends on the order (see the xfail test).
    """
    best: dict[int, Change] = {}
    for change in changes:
        current = best.get(change.mention_id)
        if current is None or version_key(change) > version_key(current):
            best[change.mention_id] = change
    return {
        mention_id: Row(
            c.organization_id or 0, c.mention_date, c.transaction_timestamp, int(c.kind), c.deleted
        )
        for mention_id, c in sorted(best.items())
    }


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
