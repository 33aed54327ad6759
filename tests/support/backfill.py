"""Test helpers for the backfill: a source table in the test's own schema, with column names other
than the read model's (the ``source`` fixture), and a way to run a backfill in-process."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime

import psycopg
import pytest
from psycopg import sql

from indexer.cache import CacheInvalidator
from indexer.config import Settings
from indexer.ops.backfill import Options, Report, backfill
from indexer.readmodel.migrate import migrate


@dataclass(frozen=True)
class SourceRow:
    id: int
    org: int | None
    happened_at: datetime | None
    version_at: datetime | None = None
    removed: bool = False


class SourceTable:
    """``<schema>.posts`` (id, org, happened_at, version_at, removed) in the read model's database."""

    def __init__(self, url: str, schema: str) -> None:
        self.url = url
        self.schema = schema
        self.table = sql.Identifier(schema, "posts")

    def create(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema)))
            conn.execute(
                sql.SQL(
                    "CREATE TABLE {} (id bigint PRIMARY KEY, org bigint, happened_at timestamptz,"
                    " version_at timestamptz, removed boolean NOT NULL DEFAULT false)"
                ).format(self.table)
            )

    def drop(self) -> None:
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(self.schema)))

    def insert(self, rows: Iterable[SourceRow]) -> None:
        with psycopg.connect(self.url) as conn, conn.cursor() as cur:
            with cur.copy(sql.SQL("COPY {} (id, org, happened_at, version_at, removed) FROM STDIN").format(self.table)) as copy:
                for r in rows:
                    copy.write_row((r.id, r.org, r.happened_at, r.version_at, r.removed))

    def execute(self, statement: str) -> None:
        """``statement`` with ``{table}`` standing for the source table (no parameters: a ``%``
        is an operator)."""
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql.SQL(statement).format(table=self.table))

    def query(self, *, versions: bool = False, deleted: bool = False) -> str:
        """A --source-query that renames the columns to what the backfill wants."""
        columns = ["id AS mention_id", "org AS organization_id", "happened_at AS mention_date"]
        if versions:
            columns.append("version_at AS transaction_timestamp")
        if deleted:
            columns.append("removed AS deleted")
        return f"SELECT {', '.join(columns)} FROM {self.schema}.posts"


@pytest.fixture
def source(settings: Settings) -> Iterator[SourceTable]:
    """The read model migrated, and an empty source table beside it (in a schema of its own)."""
    migrate(settings.database_url, settings.schema_name)
    table = SourceTable(settings.database_url, settings.schema_name + "_src")
    table.create()
    try:
        yield table
    finally:
        table.drop()


async def run_backfill(settings: Settings, query: str | None, **options: object) -> Report:
    """A backfill with the test's settings; progress goes nowhere."""
    opts = Options(
        source_url=settings.source_url,
        target_url=settings.database_url,
        schema=settings.schema_name,
        query=query,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
        **options,  # type: ignore[arg-type]
    )
    async with CacheInvalidator.from_settings(settings) as cache:
        return await backfill(opts, cache, progress_stream=io.StringIO())


def checkpoints(settings: Settings) -> list[dict[str, object]]:
    query = sql.SQL("SELECT * FROM {}").format(sql.Identifier(settings.schema_name, "backfill_checkpoints"))
    with psycopg.connect(settings.database_url, row_factory=psycopg.rows.dict_row) as conn:
        return conn.execute(query).fetchall()
