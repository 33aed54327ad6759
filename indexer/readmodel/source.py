"""The mentions table the read model is built from (``SOURCE_DATABASE_URL``): the query that reads
it, the statements made from that query, and the session that runs them, only ever reading.

The backfill (``indexer.ops.backfill``) loads the read model from it; the audit
(``indexer.audit``) compares the read model with it.  Both read it through this module.

The query
    The user's query (``--source-query``, default ``public.mentions``) is wrapped, never edited:
    ``SELECT <the columns, cast> FROM (<query>) AS source WHERE <scope and keyset> ORDER BY
    source.mention_id LIMIT n``.  Filtering and ordering on the source's own ``mention_id`` lets
    Postgres push the keyset into a plain table query and walk its primary key.  Statements that
    contain the user's query are sent without parameters, so a ``%`` in it is never taken for a
    placeholder; the values we add are SQL literals.

Only reading, whatever the query (the operator's SQL):

* the session defaults to read-only transactions (``default_transaction_read_only``, added to any
  ``options`` the URL or ``PGOPTIONS`` sets), and every statement that contains the query runs in
  an explicit ``READ ONLY`` transaction, which nothing inside it can turn read-write;
* every statement that contains the query is first sent as a prepared statement (psycopg's
  ``prepare=True``: the extended protocol, whose Parse takes exactly one statement), so a query
  that closes our wrapping to stack statements of its own is refused before anything runs;
* with source and read model in one database the chunk is inserted into the backfill's TEMP
  staging table by the read model's own session (``read_into``), in a REPEATABLE READ, READ ONLY
  transaction of that session, prepared, lexing checked: Postgres lets a read-only transaction
  write TEMP tables and nothing else;
* a COPY cannot be prepared (psycopg sends it over the simple protocol, which runs every
  statement of its text), so each COPY text is the prepared, checked statement wrapped in
  ``COPY (…) TO STDOUT``.  Postgres parses a whole text before running any of it, so that COPY
  is one statement as long as its text is read as it was when checked: after every statement
  that runs the query, the settings that change how SQL text is read
  (``standard_conforming_strings``, ``client_encoding``) must be as they were, or the run stops
  with exit 2 before the next statement is sent.

Each transaction of the session is REPEATABLE READ: one snapshot.  A timestamp without time
zone in the source is read as UTC, whatever the server's default.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg
from psycopg import sql

from indexer.errors import ConfigError
from indexer.readmodel.checksums import Method, buckets_of
from indexer.readmodel.connection import read_only_options, translate_errors
from indexer.redact import mask_url

REQUIRED_COLUMNS = ("mention_id", "organization_id", "mention_date")
OPTIONAL_COLUMNS = ("transaction_timestamp", "deleted")
DEFAULT_QUERY = "SELECT mention_id, organization_id, mention_date FROM public.mentions"
ONLY_READS = "the source query must be a single SELECT that only reads"

CONNECT_TIMEOUT_S = 5
# What decides how Postgres reads the text of a statement: a query that changes them could make
# the next statement's text read as several statements.
LEXING = "SELECT current_setting('standard_conforming_strings'), current_setting('client_encoding')"

# Rows come out in exactly the column order and types of the backfill's staging table (binary COPY).
_ROWS = """
SELECT source.mention_id::bigint AS mention_id, source.organization_id::bigint AS organization_id,
       source.mention_date::timestamptz AS mention_date,
       {transaction_timestamp} AS transaction_timestamp, {deleted} AS deleted
FROM (
{query}
) AS source
WHERE {conditions}
"""

# What the audit compares: the columns of ``indexer.readmodel.checksums.ROW_COLUMNS``.
_COMPARED = """
SELECT source.mention_id::bigint AS mention_id, source.organization_id::bigint AS organization_id,
       source.mention_date::timestamptz AS mention_date, {deleted} AS deleted,
       {transaction_timestamp} AS transaction_timestamp
FROM (
{query}
) AS source
WHERE {conditions}
"""


def normalized(query: str | None) -> str:
    """The query without surrounding blanks and trailing semicolons (it becomes a subquery)."""
    text = (DEFAULT_QUERY if query is None else query).strip()
    while text.endswith(";"):
        text = text[:-1].rstrip()
    if not text:
        raise ConfigError("--source-query is empty; give a query returning " + ", ".join(REQUIRED_COLUMNS))
    return text


def describe_query(query: str) -> sql.Composed:
    """A statement returning no row whose cursor description names the query's columns."""
    return sql.SQL("SELECT * FROM (\n{}\n) AS source LIMIT 0").format(sql.SQL(query))


def source_connection_options(url: str) -> dict[str, Any]:
    """``connection_options`` for the source, whose session defaults to read-only transactions."""
    return read_only_options(url, CONNECT_TIMEOUT_S)


def pg_message(exc: psycopg.Error) -> str:
    return exc.diag.message_primary or str(exc).strip() or type(exc).__name__


@contextmanager
def source_errors(url: str) -> Iterator[None]:
    """``Unavailable``/``Conflict`` as everywhere; a query Postgres rejects, or a value it cannot
    cast, is the operator's to fix (``ConfigError``, exit 2)."""
    try:
        with translate_errors(url):
            yield
    except pg.SyntaxError as exc:
        # The source's statements are prepared (the extended protocol), which takes one statement only.
        if "multiple commands" in pg_message(exc):
            raise ConfigError(f"{ONLY_READS}; it contains several statements (separated by ';')") from None
        raise ConfigError(f"the source query fails at {mask_url(url)}: {pg_message(exc)}") from None
    except pg.ReadOnlySqlTransaction as exc:  # the source is read in read-only transactions
        raise ConfigError(f"{ONLY_READS}: {pg_message(exc)}") from None
    except pg.FeatureNotSupported as exc:
        # The query becomes a subquery: a data-modifying WITH (DELETE ... RETURNING) is refused there.
        if "data-modifying" in pg_message(exc):
            raise ConfigError(f"{ONLY_READS}; it contains INSERT, UPDATE, DELETE or MERGE: {pg_message(exc)}") from None
        raise ConfigError(f"the source query fails at {mask_url(url)}: {pg_message(exc)}") from None
    except psycopg.ProgrammingError as exc:  # SQLSTATE class 42: syntax, names, types, privileges
        raise ConfigError(f"the source query fails at {mask_url(url)}: {pg_message(exc)}") from None
    except (psycopg.DataError, psycopg.IntegrityError) as exc:
        raise ConfigError(f"the source query returned a value that cannot be used: {pg_message(exc)}") from None


def _literal_ids(mention_ids: Sequence[int]) -> sql.Composed:
    return sql.SQL("{}::bigint[]").format(sql.Literal(list(mention_ids)))


@dataclass(frozen=True, slots=True)
class Source:
    query: str
    organizations: tuple[int, ...]
    """The scope: no organization means every one."""
    has_timestamp: bool
    has_deleted: bool

    @classmethod
    def checked(cls, query: str, organizations: Sequence[int], columns: Sequence[str]) -> Source:
        """The source, once the query's column names are known; ``ConfigError`` if one is missing."""
        missing = [name for name in REQUIRED_COLUMNS if name not in columns]
        if missing:
            raise ConfigError(
                f"the source query returns no column {', '.join(map(repr, missing))}"
                f" (it returns {', '.join(map(repr, columns)) or 'no columns'});"
                " rename columns with AS: mention_id, organization_id, mention_date"
                " [, transaction_timestamp, deleted]"
            )
        return cls(
            query,
            tuple(sorted(set(organizations))),
            has_timestamp="transaction_timestamp" in columns,
            has_deleted="deleted" in columns,
        )

    # ---- the backfill's statements (binary COPY into its staging table) ----

    def chunk(self, after: int | None, limit: int) -> sql.Composed:
        """The next ``limit`` rows of the scope after mention ``after`` (None: from the start)."""
        conditions = self._scope()
        if after is not None:
            conditions.append(sql.SQL("source.mention_id > {}").format(sql.Literal(after)))
        return sql.SQL("{} ORDER BY source.mention_id LIMIT {}").format(self._rows(conditions), sql.Literal(limit))

    def lookup(self, mention_ids: Sequence[int]) -> sql.Composed:
        """These mentions' rows, whatever their organization (a prune candidate may have moved
        out of the scope: then it still exists and must not be tombstoned)."""
        return self._rows([sql.SQL("source.mention_id = ANY({})").format(_literal_ids(mention_ids))])

    def count(self, after: int | None) -> sql.Composed:
        """The number of rows ``chunk`` will read from ``after`` on (for the ETA)."""
        conditions = self._scope()
        if after is not None:
            conditions.append(sql.SQL("source.mention_id > {}").format(sql.Literal(after)))
        return sql.SQL("SELECT count(*) FROM (\n{}\n) AS source WHERE {}").format(
            sql.SQL(self.query), sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
        )

    def checkpoint_name(self, source_url: str) -> tuple[str, str]:
        """A stable name for this source and scope, and the description it is derived from."""
        description = json.dumps(
            {"source": mask_url(source_url), "query": self.query, "organizations": list(self.organizations)},
            sort_keys=True,
        )
        return "backfill-" + hashlib.sha256(description.encode()).hexdigest()[:16], description

    # ---- the audit's statements (indexer.readmodel.checksums has the read model's twins) ----

    def bounds(self) -> sql.Composed:
        """The lowest and highest mention_id of the scope."""
        return sql.SQL(
            "SELECT min(source.mention_id)::bigint, max(source.mention_id)::bigint FROM (\n{}\n) AS source WHERE {}"
        ).format(sql.SQL(self.query), self._where(self._scope()))

    def next_id(self, after: int) -> sql.Composed:
        """The lowest mention_id of the scope after ``after`` (to step over a gap of ids)."""
        conditions = [*self._scope(), sql.SQL("source.mention_id > {}").format(sql.Literal(after))]
        return sql.SQL("SELECT min(source.mention_id)::bigint FROM (\n{}\n) AS source WHERE {}").format(
            sql.SQL(self.query), self._where(conditions)
        )

    def compared(self, ranges: Sequence[tuple[int, int]], *, limit: int | None = None) -> sql.Composed:
        """The scope's rows whose mention_id lies in one of the inclusive ``ranges``, ordered, as
        the audit compares them; ``limit`` rows at most."""
        statement = sql.SQL("{} ORDER BY 1").format(self._compared([*self._scope(), _in_ranges("source", ranges)]))
        if limit is not None:
            statement = sql.SQL("{} LIMIT {}").format(statement, sql.Literal(limit))
        return statement

    def compared_ids(self, mention_ids: Sequence[int]) -> sql.Composed:
        """These mentions' rows as the audit compares them, whatever their organization."""
        return self._compared([sql.SQL("source.mention_id = ANY({})").format(_literal_ids(mention_ids))])

    def buckets(self, lo: int, hi: int, width: int, method: Method) -> sql.Composed:
        """Per bucket of ``width`` ids from ``lo`` (up to ``hi``): the live rows' count and checksum."""
        return buckets_of(self._compared([*self._scope(), _in_ranges("source", [(lo, hi)])]), lo, width, method)

    def _scope(self) -> list[sql.Composable]:
        if not self.organizations:
            return []
        return [sql.SQL("source.organization_id = ANY({}::bigint[])").format(sql.Literal(list(self.organizations)))]

    @staticmethod
    def _where(conditions: list[sql.Composable]) -> sql.Composable:
        return sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")

    def _deleted(self) -> str:
        return "coalesce(source.deleted::boolean, false)" if self.has_deleted else "false"

    def _rows(self, conditions: list[sql.Composable]) -> sql.Composed:
        # Without a version column a row's version is its snapshot's time: the source
        # reads each chunk in one REPEATABLE READ transaction, whose transaction_timestamp() it is.
        timestamp = (
            "coalesce(source.transaction_timestamp::timestamptz, transaction_timestamp())"
            if self.has_timestamp
            else "transaction_timestamp()"
        )
        return sql.SQL(_ROWS).format(
            transaction_timestamp=sql.SQL(timestamp),
            deleted=sql.SQL(self._deleted()),
            query=sql.SQL(self.query),
            conditions=self._where(conditions),
        )

    def _compared(self, conditions: list[sql.Composable]) -> sql.Composed:
        # Without a version column the audit knows no version: nothing is in flight.
        timestamp = "source.transaction_timestamp::timestamptz" if self.has_timestamp else "NULL::timestamptz"
        return sql.SQL(_COMPARED).format(
            transaction_timestamp=sql.SQL(timestamp),
            deleted=sql.SQL(self._deleted()),
            query=sql.SQL(self.query),
            conditions=self._where(conditions),
        )


def _in_ranges(alias: str, ranges: Sequence[tuple[int, int]]) -> sql.Composable:
    """``alias.mention_id`` within one of the inclusive ranges (a BitmapOr of index range scans)."""
    if not ranges:
        return sql.SQL("false")
    terms = [
        sql.SQL("{}.mention_id BETWEEN {} AND {}").format(sql.Identifier(alias), sql.Literal(lo), sql.Literal(hi))
        for lo, hi in ranges
    ]
    return sql.SQL("({})").format(sql.SQL(" OR ").join(terms))


async def _lexing(conn: psycopg.AsyncConnection) -> tuple[Any, ...] | None:
    return await (await conn.execute(LEXING)).fetchone()


async def _lexing_unchanged(conn: psycopg.AsyncConnection, before: tuple[Any, ...] | None) -> None:
    """``ConfigError`` unless ``conn`` still reads SQL text as it did (module doc)."""
    now = await _lexing(conn)
    if now != before:
        raise ConfigError(
            f"{ONLY_READS}; it changes how SQL text is read"
            f" (standard_conforming_strings, client_encoding: {before} -> {now})"
        )


async def _transaction_time(conn: psycopg.AsyncConnection) -> datetime:
    """``transaction_timestamp()``; as a transaction's first statement, it also takes the snapshot."""
    cursor = await conn.execute("SELECT transaction_timestamp()")
    row = await cursor.fetchone()
    assert row is not None
    at: datetime = row[0]
    return at


async def read_into(conn: psycopg.AsyncConnection, rows: sql.Composed, into: sql.Composable) -> datetime:
    """Source and read model in one database: insert ``rows`` (a statement ``SourceSession.open``
    checked) into the TEMP table ``into`` on ``conn``, the read model's own session, so nothing
    passes through Python.  It runs as the module doc says the source is read: one REPEATABLE
    READ, READ ONLY transaction (Postgres lets it write TEMP tables and nothing else), prepared,
    with the lexing settings checked after it, timestamps without zone read as UTC.  Returns the
    transaction's time, the snapshot's (its first statement takes the snapshot)."""
    before = await _lexing(conn)
    await conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
    await conn.set_read_only(True)
    try:
        async with conn.transaction():
            snapshot_at = await _transaction_time(conn)
            await conn.execute("SET LOCAL TIME ZONE 'UTC'")
            await conn.execute(sql.SQL("INSERT INTO {} {}").format(into, rows), prepare=True)
            await _lexing_unchanged(conn, before)
    finally:
        if conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE:
            await conn.set_read_only(None)
            await conn.set_isolation_level(None)
    return snapshot_at


class SourceSession:
    """One connection to the source, reading as the module doc says.  ``open`` checks the query
    and returns its ``Source``; ``checked`` runs a statement that contains the query."""

    def __init__(self, conn: psycopg.AsyncConnection, url: str) -> None:
        self.conn = conn
        self.url = url
        self._lexing: tuple[Any, ...] | None = None

    @classmethod
    async def connect(cls, url: str, *, statement_timeout_s: int = 0) -> SourceSession:
        options = source_connection_options(url)
        if statement_timeout_s:
            options["options"] += f" -c statement_timeout={statement_timeout_s}s"
        with source_errors(url):
            conn = await psycopg.AsyncConnection.connect(url, autocommit=True, **options)
        return cls(conn, url)

    async def close(self) -> None:
        await self.conn.close()

    async def open(self, query: str, organizations: Sequence[int]) -> Source:
        """Set the session up and check the query: its columns, that every column casts to the
        read model's type, and that the text every COPY wraps is one statement."""
        with source_errors(self.url):
            await self.conn.execute("SET TIME ZONE 'UTC'")
            await self.conn.set_isolation_level(psycopg.IsolationLevel.REPEATABLE_READ)
            await self.conn.set_read_only(True)  # every transaction() below: BEGIN ... READ ONLY
            self._lexing = await _lexing(self.conn)
            async with self.conn.transaction():
                # Column names first, before anything is streamed or written.  (One statement,
                # or its preparation refuses it: see the module doc.)
                cursor = await self.checked(describe_query(query))
                columns = [column.name for column in cursor.description or ()]
                source = Source.checked(query, organizations, columns)
                await self.checked(source.chunk(None, 0))
                await self.checked(source.compared([(0, 0)], limit=0))
        return source

    @asynccontextmanager
    async def snapshot(self) -> AsyncIterator[datetime]:
        """One REPEATABLE READ, read-only transaction; yields its time (``transaction_timestamp()``,
        taken by its first statement, which also takes the snapshot)."""
        with source_errors(self.url):
            async with self.conn.transaction():
                yield await _transaction_time(self.conn)

    async def checked(self, statement: sql.SQL | sql.Composed) -> psycopg.AsyncCursor[tuple[Any, ...]]:
        """Run a statement that contains the query as a prepared statement, then make sure it left
        the reading of SQL text as it was (module doc)."""
        cursor = await self.conn.execute(statement, prepare=True)
        await self.lexing_unchanged()
        return cursor

    async def fetch(self, statement: sql.SQL | sql.Composed) -> list[tuple[Any, ...]]:
        """The rows of a checked statement, in its own snapshot unless inside ``snapshot``."""
        with source_errors(self.url):
            if self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                return await (await self.checked(statement)).fetchall()
            async with self.conn.transaction():
                return await (await self.checked(statement)).fetchall()

    async def lexing_unchanged(self) -> None:
        await _lexing_unchanged(self.conn, self._lexing)

    async def copy_out(self, rows: sql.Composable) -> AsyncGenerator[bytes | bytearray | memoryview]:
        """``rows`` (a checked statement) as binary COPY data."""
        with source_errors(self.url):
            statement = sql.SQL("COPY (\n{}\n) TO STDOUT (FORMAT BINARY)").format(rows)
            async with self.conn.cursor().copy(statement) as out:
                async for data in out:
                    yield data
            await self.lexing_unchanged()
