"""Reading the read model back: ``<schema>.mentions`` as ``{mention_id: (columns...)}``.

``read_mentions`` blocks; ``aread_mentions`` does the same over ``psycopg.AsyncConnection``, for
async tests that run the service in their own event loop (a blocking connect there would stall
it).  Nothing here imports ``indexer``: the black-box suite reads the table through it too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import dict_row

# What a change leaves in its row, in the order the tests compare it.
STATE = ("organization_id", "mention_date", "transaction_timestamp", "deleted")


def _query(schema: str, columns: Sequence[str]) -> sql.Composed:
    return sql.SQL("SELECT mention_id, {} FROM {} ORDER BY mention_id").format(
        sql.SQL(", ").join(map(sql.Identifier, columns)), sql.Identifier(schema, "mentions")
    )


def read_mentions(
    url: str, schema: str, columns: Sequence[str] = STATE, *, missing_ok: bool = False
) -> dict[int, tuple[Any, ...]]:
    """mention_id → ``columns`` of every row; ``{}`` for a table not created yet if ``missing_ok``."""
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            return {row[0]: tuple(row[1:]) for row in conn.execute(_query(schema, columns))}
    except psycopg.errors.UndefinedTable:
        if missing_ok:
            return {}
        raise


async def aread_mentions(
    url: str, schema: str, columns: Sequence[str] = STATE, *, missing_ok: bool = False
) -> dict[int, tuple[Any, ...]]:
    """``read_mentions`` without blocking the event loop."""
    try:
        async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
            cursor = await conn.execute(_query(schema, columns))
            return {row[0]: tuple(row[1:]) for row in await cursor.fetchall()}
    except psycopg.errors.UndefinedTable:
        if missing_ok:
            return {}
        raise


def read_mention(url: str, schema: str, mention_id: int) -> dict[str, Any] | None:
    """Every column of one row, for tests that look at the bookkeeping columns too."""
    query = sql.SQL("SELECT * FROM {} WHERE mention_id = %s").format(sql.Identifier(schema, "mentions"))
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(query, (mention_id,)).fetchone()
