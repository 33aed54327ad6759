"""Test helpers for the read model: the table as ``Row``s, the store of a test, and the table that
applying the changes in version order gives (the oracle)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import NamedTuple

import psycopg
import pytest
from psycopg import sql

from indexer.changes import Change, Kind, version_key
from indexer.config import Settings
from indexer.readmodel.migrate import migrate
from indexer.readmodel.store import Store
from tests.support.clock import at
from tests.support.tables import aread_mentions, read_mentions


class Row(NamedTuple):
    """The columns that must converge (``updated_at`` and ``previous_organization_id`` depend on
    the delivery order by design)."""

    organization_id: int
    mention_date: datetime | None
    transaction_timestamp: datetime
    change_kind: int
    deleted: bool


def read_table(url: str, schema: str) -> dict[int, Row]:
    return {mention_id: Row(*rest) for mention_id, rest in read_mentions(url, schema, Row._fields).items()}


async def aread_table(url: str, schema: str) -> dict[int, Row]:
    """``read_table`` without blocking the event loop."""
    return {mention_id: Row(*rest) for mention_id, rest in (await aread_mentions(url, schema, Row._fields)).items()}


def table(settings: Settings) -> dict[int, Row]:
    """The test's read model."""
    return read_table(settings.database_url, settings.schema_name)


def truncate(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(sql.SQL("TRUNCATE {}").format(sql.Identifier(schema, "mentions")))


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    """The test's schema migrated, and a store on it."""
    migrate(settings.database_url, settings.schema_name)
    async with Store(settings.database_url, settings.schema_name) as s:
        yield s


def oracle(changes: Iterable[Change]) -> dict[int, Row]:
    """The table the changes define: every change applied in version order, each replacing the row
    but leaving the fields it does not carry (organization None or 0, mention_date None) as they
    were.  Deliberately not the store's algorithm (registers)."""
    rows: dict[int, Row] = {}
    for c in sorted(changes, key=version_key):
        current = rows.get(c.mention_id)
        organization_id = c.organization_id or (current.organization_id if current else 0)
        mention_date = c.mention_date if c.mention_date is not None else (current.mention_date if current else None)
        rows[c.mention_id] = Row(organization_id, mention_date, c.transaction_timestamp, int(c.kind), c.deleted)
    return dict(sorted(rows.items()))


def change(
    kind: Kind,
    mention_id: int,
    organization_id: int | None,
    ts_s: float,
    date_s: float | None = 0,
) -> Change:
    """A Change with its timestamps given as seconds after ``T0`` (tests/support/clock.py)."""
    return Change(
        kind=kind,
        mention_id=mention_id,
        organization_id=organization_id,
        mention_date=None if date_s is None else at(date_s),
        transaction_timestamp=at(ts_s),
    )
