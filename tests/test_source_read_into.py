"""``source.read_into``: with source and read model in one database, a chunk is inserted into a
TEMP table by the read model's session, and the source query still only reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import psycopg
import pytest
from psycopg import errors as pg
from psycopg import sql

from indexer.config import Settings
from indexer.errors import ConfigError
from indexer.readmodel.source import read_into


@pytest.fixture
async def conn(settings: Settings) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as c:
        schema = sql.Identifier(settings.schema_name)
        await c.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        await c.execute(sql.SQL("CREATE TABLE {}.log (x int)").format(schema))
        await c.execute(
            sql.SQL(
                "CREATE FUNCTION {}.logged(bigint) RETURNS bigint LANGUAGE plpgsql AS"
                " $$ BEGIN INSERT INTO {}.log VALUES (1); RETURN $1; END $$"
            ).format(schema, schema)
        )
        await c.execute("CREATE TEMP TABLE staged (x bigint, at timestamptz) ON COMMIT PRESERVE ROWS")
        yield c


INTO = sql.SQL("pg_temp.staged (x, at)")


async def test_rows_land_in_the_temp_table_at_the_snapshot_time(conn: psycopg.AsyncConnection) -> None:
    at = await read_into(conn, sql.SQL("SELECT g, transaction_timestamp() FROM generate_series(1, 3) AS g"), INTO)
    rows = await (await conn.execute("SELECT x, at FROM staged ORDER BY x")).fetchall()
    assert rows == [(1, at), (2, at), (3, at)] and isinstance(at, datetime)
    # The session is as it was: read-write, default isolation, for the merge that follows.
    assert conn.read_only is None and conn.isolation_level is None
    await conn.execute("CREATE TEMP TABLE after_it (x int)")  # a write outside: allowed again


async def test_a_query_that_writes_a_table_is_refused_and_writes_nothing(
    conn: psycopg.AsyncConnection, settings: Settings
) -> None:
    logged = sql.SQL("SELECT {}.logged(g), now() FROM generate_series(1, 3) AS g").format(
        sql.Identifier(settings.schema_name)
    )
    with pytest.raises(pg.ReadOnlySqlTransaction):
        await read_into(conn, logged, INTO)
    log = sql.SQL("SELECT count(*) FROM {}.log").format(sql.Identifier(settings.schema_name))
    assert await (await conn.execute(log)).fetchone() == (0,)
    assert await (await conn.execute("SELECT count(*) FROM staged")).fetchone() == (0,)
    assert conn.read_only is None


async def test_a_query_that_changes_how_sql_is_read_is_refused(conn: psycopg.AsyncConnection) -> None:
    query = sql.SQL(
        "SELECT g, now() FROM generate_series(1, 3) AS g"
        " WHERE set_config('standard_conforming_strings', 'off', false) IS NOT NULL"
    )
    with pytest.raises(ConfigError, match="changes how SQL text is read"):
        await read_into(conn, query, INTO)
    assert await (await conn.execute("SELECT count(*) FROM staged")).fetchone() == (0,)


async def test_stacked_statements_are_refused(conn: psycopg.AsyncConnection) -> None:
    with pytest.raises(pg.SyntaxError, match="multiple commands"):
        await read_into(conn, sql.SQL("SELECT 1, now(); CREATE TABLE sneaked (x int)"), INTO)
    assert await (await conn.execute("SELECT to_regclass('sneaked') IS NULL")).fetchone() == (True,)
