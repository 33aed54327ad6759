"""Schema migrations: the versioned SQL files of ``indexer/readmodel/migrations`` applied in order.

A runner of our own (about 50 lines) because the migration libraries fit psycopg 3 and a schema
chosen at run time poorly.  One run is one transaction under an advisory lock keyed by the schema
name, so indexers starting together apply each migration exactly once and the others wait, then
find nothing to do.  Applied versions are recorded in ``<schema>.schema_migrations``.

Files are named ``NNNN_description.sql``; the version is ``NNNN``.  A file is a ``psycopg.sql``
template: ``{schema}`` is the quoted schema name and a literal brace must be doubled.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from indexer.readmodel.connection import connection_options, translate_errors

_FILE_NAME = re.compile(r"^(\d{4})_\w+\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    version: str
    template: str

    def render(self, schema: str) -> sql.Composed:
        return sql.SQL(self.template).format(schema=sql.Identifier(schema))


def migrations() -> list[Migration]:
    """Every migration shipped with the package, in version order."""
    found: dict[str, Migration] = {}
    # Beside this module (not importlib.resources): works the same in a wheel and in any editable install.
    for resource in (Path(__file__).parent / "migrations").iterdir():
        if not resource.name.endswith(".sql"):
            continue
        # A misnamed or duplicate file would otherwise be skipped or applied in a surprising order.
        match = _FILE_NAME.match(resource.name)
        if match is None or match.group(1) in found:
            raise ValueError(f"migration file {resource.name!r}: want a unique NNNN_description.sql")
        found[match.group(1)] = Migration(match.group(1), resource.read_text(encoding="utf-8"))
    return [found[version] for version in sorted(found)]


def _prologue(schema: str) -> list[sql.Composed]:
    """Statements before reading what is applied.  The lock comes first, so even CREATE SCHEMA
    (which races with itself despite IF NOT EXISTS) runs alone."""
    name = sql.Identifier(schema)
    lock_key = sql.Literal(f"mention-indexer migrate {schema}")
    return [
        sql.SQL("SELECT pg_advisory_xact_lock(hashtextextended({}, 0))").format(lock_key),
        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(name),
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {}.schema_migrations"
            " (version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        ).format(name),
    ]


def _applied_query(schema: str) -> sql.Composed:
    return sql.SQL("SELECT version FROM {}.schema_migrations").format(sql.Identifier(schema))


def _record_query(schema: str) -> sql.Composed:
    return sql.SQL("INSERT INTO {}.schema_migrations (version) VALUES (%s)").format(sql.Identifier(schema))


def _pending(applied: set[str]) -> list[Migration]:
    # Versions recorded but unknown here (a newer indexer ran) are left alone.
    return [m for m in migrations() if m.version not in applied]


def migrate(target: str | psycopg.Connection, schema: str) -> list[str]:
    """Create or upgrade the read model; returns the versions applied by this call.

    ``target`` is a URL or an idle connection (READ COMMITTED, so it sees what a concurrent run
    committed while this one waited for the lock).
    """
    url = target if isinstance(target, str) else target.info.dsn
    with translate_errors(url):
        conn = psycopg.connect(target, autocommit=True, **connection_options(5)) if isinstance(target, str) else target
        try:
            with conn.transaction():
                for statement in _prologue(schema):
                    conn.execute(statement)
                pending = _pending({row[0] for row in conn.execute(_applied_query(schema))})
                for migration in pending:
                    conn.execute(migration.render(schema))
                    conn.execute(_record_query(schema), (migration.version,))
        finally:
            if conn is not target:
                conn.close()
    return [m.version for m in pending]


async def migrate_async(target: str | psycopg.AsyncConnection, schema: str) -> list[str]:
    """``migrate`` for the event loop (the service runs it at start)."""
    url = target if isinstance(target, str) else target.info.dsn
    with translate_errors(url):
        conn = (
            await psycopg.AsyncConnection.connect(target, autocommit=True, **connection_options(5))
            if isinstance(target, str)
            else target
        )
        try:
            async with conn.transaction():
                for statement in _prologue(schema):
                    await conn.execute(statement)
                cursor = await conn.execute(_applied_query(schema))
                pending = _pending({row[0] for row in await cursor.fetchall()})
                for migration in pending:
                    await conn.execute(migration.render(schema))
                    await conn.execute(_record_query(schema), (migration.version,))
        finally:
            if conn is not target:
                await conn.close()
    return [m.version for m in pending]
