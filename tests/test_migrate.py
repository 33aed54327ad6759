"""Migrations: applied once, in order, idempotent, and safe when several indexers start together."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

import indexer.readmodel.migrate
from indexer.config import Settings
from indexer.errors import Unavailable
from indexer.readmodel.migrate import migrate, migrate_async, migrations

STARTERS = 5


def applied_versions(url: str, schema: str) -> list[str]:
    query = sql.SQL("SELECT version FROM {} ORDER BY version").format(sql.Identifier(schema, "schema_migrations"))
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute(query)]


def tables(url: str, schema: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,))
        return {row[0] for row in rows}


def test_every_shipped_file_is_a_migration_in_order() -> None:
    names = sorted(r.name for r in (Path(indexer.readmodel.migrate.__file__).parent / "migrations").iterdir() if r.name.endswith(".sql"))
    versions = [m.version for m in migrations()]
    assert versions == [name[:4] for name in names] and versions == sorted(set(versions))
    assert all(re.fullmatch(r"\d{4}_\w+\.sql", name) for name in names)


def test_migrate_creates_the_read_model_then_does_nothing(settings: Settings) -> None:
    url, schema = settings.database_url, settings.schema_name
    everything = [m.version for m in migrations()]
    assert migrate(url, schema) == everything
    assert migrate(url, schema) == []
    assert applied_versions(url, schema) == everything
    assert {"mentions", "backfill_checkpoints", "schema_migrations"} <= tables(url, schema)


def test_migrate_accepts_a_connection(settings: Settings) -> None:
    with psycopg.connect(settings.database_url) as conn:
        assert migrate(conn, settings.schema_name) == [m.version for m in migrations()]
    assert applied_versions(settings.database_url, settings.schema_name) == [m.version for m in migrations()]


def test_concurrent_starts_apply_each_migration_once(settings: Settings) -> None:
    with ThreadPoolExecutor(STARTERS) as pool:
        results = list(pool.map(lambda _: migrate(settings.database_url, settings.schema_name), range(STARTERS)))
    assert sorted(results, key=len, reverse=True) == [[m.version for m in migrations()]] + [[]] * (STARTERS - 1)
    assert applied_versions(settings.database_url, settings.schema_name) == [m.version for m in migrations()]


async def test_concurrent_async_starts_apply_each_migration_once(settings: Settings) -> None:
    results = await asyncio.gather(
        *(migrate_async(settings.database_url, settings.schema_name) for _ in range(STARTERS))
    )
    assert sorted(results, key=len, reverse=True) == [[m.version for m in migrations()]] + [[]] * (STARTERS - 1)
    assert await migrate_async(settings.database_url, settings.schema_name) == []


def test_schema_name_is_quoted(settings: Settings) -> None:
    # Not reachable through Settings (it only allows plain identifiers), but the runner must not care.
    schema = settings.schema_name + "_Odd-Name"
    try:
        assert migrate(settings.database_url, schema) == [m.version for m in migrations()]
        assert "mentions" in tables(settings.database_url, schema)
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))


def test_unreachable_postgres_is_unavailable_without_password() -> None:
    with pytest.raises(Unavailable) as caught:
        migrate("postgresql://postgres:secret@127.0.0.1:1/x", "s")
    assert "secret" not in str(caught.value) and "127.0.0.1:1" in str(caught.value)
