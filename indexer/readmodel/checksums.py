"""What the audit reads from the read model, and the checksums both sides compute alike.

The audit (``indexer.audit``) compares the source with the read model by id range: each side
returns, per bucket of ids, the number of its *live* rows (not deleted) and a checksum of their
``(mention_id, organization_id, mention_date)``.  Equal buckets are equal, bar a collision of
64-bit hashes; only the others are read row by row.  The source's statements are made by
``indexer.readmodel.source.Source`` from the same ``buckets_of``; this module has the read
model's, and ``ModelReader`` runs them.

Rows compared, on either side: ``ROW_COLUMNS`` in that order.

Checksums: ``record`` hashes each row with ``hash_record_extended`` (PostgreSQL 14+; per column the
type's own hash, so independent of the time zone and of text formats) and folds them with
``bit_xor``; about 150 ms for a million rows.  When the two servers disagree on it (another major
version, or one older than 14), both sides use ``md5``, slower but the same everywhere.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from indexer.errors import ConfigError, IndexerError
from indexer.readmodel.connection import close_quietly, read_model_required, read_only_options
from indexer.redact import mask_url

ROW_COLUMNS = ("mention_id", "organization_id", "mention_date", "deleted", "transaction_timestamp")
_CONNECT_TIMEOUT_S = 5


class Method(enum.Enum):
    RECORD = "record"
    MD5 = "md5"


_ROW_HASH = {
    Method.RECORD: "hash_record_extended(row(r.mention_id, r.organization_id, r.mention_date), 0)",
    # 60 bits of an md5 of the row as text: numbers as digits, the date as epoch seconds.
    Method.MD5: (
        "('x' || substr(md5(concat_ws(',', r.mention_id, coalesce(r.organization_id::text, ''),"
        " coalesce(extract(epoch FROM r.mention_date)::text, ''))), 1, 15))::bit(60)::bigint"
    ),
}
_FOLD = {Method.RECORD: "bit_xor({})", Method.MD5: "sum({})"}

# The same row on both servers must give the same hash: asked of each side before comparing.
PROBE = sql.SQL(
    "SELECT hash_record_extended(row(1234567::bigint, 89::bigint, timestamptz '2001-02-03 04:05:06.789+00'), 0)"
)

_BUCKETS = """
SELECT ((r.mention_id - {lo}) / {width})::bigint AS bucket, count(*) AS rows, {fold} AS checksum
FROM (
{rows}
) AS r
WHERE NOT r.deleted
GROUP BY 1
"""

_MODEL_ROWS = """
SELECT m.mention_id, m.organization_id, m.mention_date, m.deleted, m.transaction_timestamp
FROM {mentions} AS m
WHERE {conditions}
"""


def buckets_of(rows: sql.Composable, lo: int, width: int, method: Method) -> sql.Composed:
    """Per bucket ``(mention_id - lo) / width`` of ``rows`` (a statement returning ``ROW_COLUMNS``):
    the number of live rows and their checksum."""
    if width < 1:
        raise ValueError(f"bucket width must be at least 1, got {width}")
    fold = sql.SQL(_FOLD[method].format(_ROW_HASH[method]))
    return sql.SQL(_BUCKETS).format(lo=sql.Literal(lo), width=sql.Literal(width), fold=fold, rows=rows)


def _in_ranges(ranges: Sequence[tuple[int, int]]) -> sql.Composable:
    if not ranges:
        return sql.SQL("false")
    terms = [sql.SQL("m.mention_id BETWEEN {} AND {}").format(sql.Literal(lo), sql.Literal(hi)) for lo, hi in ranges]
    return sql.SQL("({})").format(sql.SQL(" OR ").join(terms))


@contextmanager
def model_errors(url: str, schema: str) -> Iterator[None]:
    """``Unavailable``/``Conflict`` as everywhere; a read model that is not there is the operator's."""
    try:
        with read_model_required(url, schema):
            yield
    except psycopg.Error as exc:
        raise IndexerError(f"postgres at {mask_url(url)} refused the audit: {exc.sqlstate} {exc}") from exc


class ModelReader:
    """The read model's side of the audit, over one read-only connection of its own.

    Each method is one statement, so one snapshot.  ``organizations`` is the scope (none: all)."""

    def __init__(
        self, url: str, schema: str, organizations: Sequence[int] = (), *, statement_timeout_s: int = 0
    ) -> None:
        self.url = url
        self.schema = schema
        self.organizations = tuple(sorted(set(organizations)))
        self._statement_timeout_s = statement_timeout_s
        self._mentions = sql.Identifier(schema, "mentions")
        self._conn: psycopg.AsyncConnection | None = None

    async def _connection(self) -> psycopg.AsyncConnection:
        if self._conn is None or self._conn.closed:
            flags = ["-c TimeZone=UTC"]
            if self._statement_timeout_s:
                flags.append(f"-c statement_timeout={self._statement_timeout_s}s")
            options = read_only_options(self.url, _CONNECT_TIMEOUT_S, *flags)
            with model_errors(self.url, self.schema):
                self._conn = await psycopg.AsyncConnection.connect(self.url, autocommit=True, **options)
        return self._conn

    async def _fetch(self, statement: sql.SQL | sql.Composed) -> list[tuple[Any, ...]]:
        conn = await self._connection()
        try:
            with model_errors(self.url, self.schema):
                cursor = await conn.execute(statement)
                rows: list[tuple[Any, ...]] = await cursor.fetchall()
                return rows
        except BaseException:
            if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE or conn.broken:
                await self.aclose()
            raise

    async def aclose(self) -> None:
        conn, self._conn = self._conn, None
        await close_quietly(conn)

    async def probe(self) -> int | None:
        """The probe row's hash here; None where ``hash_record_extended`` does not exist."""
        try:
            rows = await self._fetch(PROBE)
        except ConfigError:  # UndefinedFunction, as model_errors reads it
            return None
        return int(rows[0][0])

    async def watermark(self) -> datetime | None:
        """The newest version the read model has applied: the live path's watermark."""
        rows = await self._fetch(sql.SQL("SELECT max(transaction_timestamp) FROM {}").format(self._mentions))
        value: datetime | None = rows[0][0]
        return value

    async def estimated_rows(self) -> int | None:
        """Postgres's estimate of the table's rows (no scan), None if it has none yet."""
        rows = await self._fetch(
            sql.SQL(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(format('%I.mentions', {}::text))"
            ).format(sql.Literal(self.schema))
        )
        value = int(rows[0][0]) if rows and rows[0][0] is not None else -1
        return value if value > 0 else None

    async def bounds(self) -> tuple[int | None, int | None]:
        rows = await self._fetch(
            sql.SQL("SELECT min(m.mention_id), max(m.mention_id) FROM {} AS m WHERE {}").format(
                self._mentions, self._where([])
            )
        )
        return rows[0][0], rows[0][1]

    async def next_id(self, after: int) -> int | None:
        condition = sql.SQL("m.mention_id > {}").format(sql.Literal(after))
        rows = await self._fetch(
            sql.SQL("SELECT min(m.mention_id) FROM {} AS m WHERE {}").format(self._mentions, self._where([condition]))
        )
        value: int | None = rows[0][0]
        return value

    async def buckets(self, lo: int, hi: int, width: int, method: Method) -> dict[int, tuple[int, Any]]:
        rows = self._rows([_in_ranges([(lo, hi)])])
        return {
            bucket: (count, checksum)
            for bucket, count, checksum in await self._fetch(buckets_of(rows, lo, width, method))
        }

    async def compared(self, ranges: Sequence[tuple[int, int]], *, limit: int | None = None) -> list[tuple[Any, ...]]:
        """The scope's rows in ``ranges`` (``ROW_COLUMNS``), ordered by mention_id."""
        statement = sql.SQL("{} ORDER BY 1").format(self._rows([_in_ranges(ranges)]))
        if limit is not None:
            statement = sql.SQL("{} LIMIT {}").format(statement, sql.Literal(limit))
        return await self._fetch(statement)

    async def compared_ids(self, mention_ids: Sequence[int]) -> list[tuple[Any, ...]]:
        """These mentions' rows, whatever their organization."""
        condition = sql.SQL("m.mention_id = ANY({}::bigint[])").format(sql.Literal(list(mention_ids)))
        return await self._fetch(sql.SQL(_MODEL_ROWS).format(mentions=self._mentions, conditions=condition))

    def _where(self, conditions: list[sql.Composable]) -> sql.Composable:
        if self.organizations:
            conditions = [
                *conditions,
                sql.SQL("m.organization_id = ANY({}::bigint[])").format(sql.Literal(list(self.organizations))),
            ]
        return sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")

    def _rows(self, conditions: list[sql.Composable]) -> sql.Composed:
        return sql.SQL(_MODEL_ROWS).format(mentions=self._mentions, conditions=self._where(conditions))
