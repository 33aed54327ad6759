"""The backfill's side of the read model: stage a chunk, merge it, record the checkpoint.

A chunk is COPYed into a TEMP staging table, prune tombstones are added to it, and ONE statement
merges it: ``merge.merge_statement``, the live path's statement, with the backfill's stronger
condition (write only what changes a visible field; see ``indexer.ops.backfill``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import errors as pg
from psycopg import sql

from indexer.errors import ConfigError, IndexerError
from indexer.readmodel.merge import changes_a_field, merge_statement

_LOCK_WAIT_S = 10

_CREATE_STAGING = """
CREATE TEMP TABLE IF NOT EXISTS backfill_rows (
    mention_id            bigint      NOT NULL,
    organization_id       bigint,
    mention_date          timestamptz,
    transaction_timestamp timestamptz NOT NULL,
    deleted               boolean     NOT NULL,
    -- A tombstone for a read-model row the source no longer has (--prune).
    pruned                boolean     NOT NULL DEFAULT false,
    CONSTRAINT present_rows_have_an_organization CHECK (deleted OR nullif(organization_id, 0) IS NOT NULL)
) ON COMMIT PRESERVE ROWS
"""
# Kept across commits: with source and read model in one database a chunk is staged in a read-only
# transaction of its own before the one that merges it (``source.read_into``); emptied before each
# chunk instead.

# The staging table with the columns a source row fills, in the order ``source`` selects them.
STAGING_INTO = sql.SQL(
    "pg_temp.backfill_rows (mention_id, organization_id, mention_date, transaction_timestamp, deleted)"
)

COPY_INTO_STAGING = sql.SQL("COPY {} FROM STDIN (FORMAT BINARY)").format(STAGING_INTO)

# Staged rows as the merge's incoming relation: a present row is an Insert, a deleted one a
# Delete (the lowest and highest kinds: a live change in the same µs beats a present row, and
# nothing beats a tombstone).  Organization 0 is "not set", as on the wire.
_INCOMING = """
SELECT r.mention_id, v.version, r.transaction_timestamp, k.change_kind, r.deleted, r.pruned,
       nullif(r.organization_id, 0) AS organization_id,
       CASE WHEN nullif(r.organization_id, 0) IS NULL THEN ''::bytea ELSE v.version END AS organization_version,
       r.mention_date,
       CASE WHEN r.mention_date IS NULL THEN ''::bytea ELSE v.version END AS mention_date_version
FROM backfill_rows AS r
CROSS JOIN LATERAL (SELECT (CASE WHEN r.deleted THEN 3 ELSE 1 END)::smallint AS change_kind) AS k
CROSS JOIN LATERAL (
    SELECT {version_bytes}(r.transaction_timestamp, k.change_kind, r.organization_id, r.mention_date) AS version
) AS v
"""

# The merge skips, before locking anything, the rows that change no field of the stored row:
# ON CONFLICT locks (and WAL-logs) every conflicting row even when it then writes nothing,
# which would make a rerun slower than the first run.  Skipping on an unlocked read is the
# unchanged rule applied a moment earlier: same outcome as a backfill that ran then.
#
# The staged rows' id range, given to every lookup of the read model, lets Postgres read just
# that range of the primary key instead of hashing the whole table once per chunk.
_STAGED_RANGE = """
m.mention_id BETWEEN (SELECT min(mention_id) FROM backfill_rows) AND (SELECT max(mention_id) FROM backfill_rows)
"""

_MERGE = """
WITH incoming AS ({incoming}),
changing AS (
    SELECT * FROM incoming AS c
    WHERE NOT EXISTS (
        SELECT FROM {mentions} AS m
        WHERE m.mention_id = c.mention_id AND {staged_range} AND NOT ({changes})
    )
),
written AS ({merge})
SELECT true, w.mention_id, w.version = i.version, i.pruned, w.organization_id, w.previous_organization_id
FROM written AS w JOIN incoming AS i USING (mention_id)
UNION ALL
-- Why the rows it did not write were left alone, in the same statement (incoming is computed
-- once): the stored row is newer (stale), or the same (unchanged).  It reads the statement's
-- snapshot, which for a row the merge did not write is the row as stored, but for concurrent
-- writes committed meanwhile (which only move a row between these two counts).
SELECT false, count(*) FILTER (WHERE m.version > i.version), NULL, NULL, count(*), NULL
FROM incoming AS i JOIN {mentions} AS m USING (mention_id)
WHERE {staged_range} AND i.mention_id NOT IN (SELECT mention_id FROM written)
"""

_STAGED = "SELECT count(*), max(mention_id), count(*) - count(DISTINCT mention_id) FROM backfill_rows"

# Read-model rows of the scope within (after, up_to] that the chunk does not have.
_PRUNE_CANDIDATES = """
SELECT {select} FROM {mentions} AS m
WHERE NOT m.deleted AND {conditions}
  AND NOT EXISTS (SELECT FROM backfill_rows AS r WHERE r.mention_id = m.mention_id)
"""

_CHECKPOINT = """
INSERT INTO {checkpoints} AS k
    (name, description, last_mention_id, snapshot_at, pending_organizations, completed_at)
VALUES (%s, %s, %s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET
    description = EXCLUDED.description,
    last_mention_id = EXCLUDED.last_mention_id,
    snapshot_at = EXCLUDED.snapshot_at,
    pending_organizations = EXCLUDED.pending_organizations,
    completed_at = EXCLUDED.completed_at,
    updated_at = now()
"""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    last_mention_id: int | None
    pending_organizations: frozenset[int]
    completed: bool


@dataclass(slots=True)
class Counts:
    """What happened to the rows of a chunk or a run (see ``indexer.ops.backfill`` for the meanings)."""

    read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    stale: int = 0
    tombstoned: int = 0
    organizations: set[int] = field(default_factory=set)
    """Organizations whose caches must go: those of every row written, and where it came from."""

    def add(self, other: Counts) -> None:
        self.read += other.read
        self.inserted += other.inserted
        self.updated += other.updated
        self.unchanged += other.unchanged
        self.stale += other.stale
        self.tombstoned += other.tombstoned
        self.organizations |= other.organizations


class Target:
    """Statements on the read model's connection; the caller owns its transactions."""

    def __init__(self, conn: psycopg.AsyncConnection, schema: str, organizations: Sequence[int]) -> None:
        self._conn = conn
        self._organizations = list(organizations)
        mentions = sql.Identifier(schema, "mentions")
        incoming = sql.SQL(_INCOMING).format(version_bytes=sql.Identifier(schema, "version_bytes"))
        merge = merge_statement(mentions, sql.SQL("changing AS c"), only_changed_fields=True)
        staged_range = sql.SQL(_STAGED_RANGE.strip())
        self._merge = sql.SQL(_MERGE).format(
            incoming=incoming,
            mentions=mentions,
            staged_range=staged_range,
            changes=changes_a_field("c", "m"),
            merge=merge,
        )
        self._mentions = mentions
        self._checkpoints = sql.Identifier(schema, "backfill_checkpoints")

    async def prepare(self) -> None:
        await self._conn.execute(_CREATE_STAGING)

    async def clear_staging(self) -> None:
        """Before each chunk (and each attempt of it): what a failed or rolled-back one left."""
        await self._conn.execute("TRUNCATE pg_temp.backfill_rows")

    async def lock(self, name: str) -> None:
        """Hold the run's name for this session, so two runs never share a checkpoint.  Waits a
        little: the backend of a run just killed may not have noticed yet."""
        try:
            async with self._conn.transaction():
                await self._conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{_LOCK_WAIT_S}s")))
                await self._conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (name,))
        except pg.LockNotAvailable:
            raise IndexerError(
                f"another backfill of the same source and scope is running (checkpoint {name})"
            ) from None

    async def staged(self) -> tuple[int, int | None]:
        """Rows staged so far and the highest mention among them.

        ``ConfigError`` if a mention came twice: which row would win is not defined, and the
        keyset walk (``mention_id > last``) assumes unique ids.  (A duplicate that falls on both
        sides of a chunk boundary cannot be seen here.)"""
        cursor = await self._conn.execute(_STAGED)
        count, last, duplicates = await cursor.fetchone() or (0, None, 0)
        if duplicates:
            raise ConfigError("the source query returns a mention_id more than once; it must be unique")
        return count, last

    async def prune_candidates(self, after: int | None, up_to: int | None) -> list[int]:
        cursor = await self._conn.execute(self._candidates(after, up_to, sql.SQL("m.mention_id")))
        return [row[0] for row in await cursor.fetchall()]

    async def stage_tombstones(self, after: int | None, up_to: int | None, snapshot_at: datetime) -> None:
        """Stage a Delete at the snapshot's time for every candidate still unstaged."""
        select = sql.SQL("m.mention_id, NULL::bigint, NULL::timestamptz, {}::timestamptz, true, true").format(
            sql.Literal(snapshot_at)
        )
        await self._conn.execute(
            sql.SQL(
                "INSERT INTO backfill_rows"
                " (mention_id, organization_id, mention_date, transaction_timestamp, deleted, pruned) {}"
            ).format(self._candidates(after, up_to, select))
        )

    async def merge(self) -> Counts:
        """Merge the staged rows; count and collect organizations.  The staging table empties at
        the end of the transaction."""
        counts = Counts()
        cursor = await self._conn.execute(self._merge, binary=True)
        for (
            was_written,
            mention_id,
            advanced,
            pruned,
            organization_id,
            previous_organization_id,
        ) in await cursor.fetchall():
            if not was_written:  # the one row of the rows it did not write
                stale, not_written = mention_id, organization_id
                counts.stale += stale
                counts.unchanged += not_written - stale
                continue
            if previous_organization_id is None:
                counts.inserted += 1
            elif not advanced:
                counts.stale += 1  # stale, yet it filled a field newer changes had left out
            elif pruned:
                counts.tombstoned += 1
            else:
                counts.updated += 1
            counts.organizations.add(organization_id)
            if previous_organization_id is not None:
                counts.organizations.add(previous_organization_id)
        counts.organizations.discard(0)  # the placeholder of a tombstone without organization
        return counts

    async def checkpoint(self, name: str) -> Checkpoint | None:
        cursor = await self._conn.execute(
            sql.SQL(
                "SELECT last_mention_id, pending_organizations, completed_at IS NOT NULL FROM {} WHERE name = %s"
            ).format(self._checkpoints),
            (name,),
        )
        row = await cursor.fetchone()
        return None if row is None else Checkpoint(row[0], frozenset(row[1]), row[2])

    async def record(
        self,
        name: str,
        description: str,
        last_mention_id: int | None,
        snapshot_at: datetime | None,
        pending_organizations: Sequence[int],
        completed_at: datetime | None,
    ) -> None:
        await self._conn.execute(
            sql.SQL(_CHECKPOINT).format(checkpoints=self._checkpoints),
            (name, description, last_mention_id, snapshot_at, list(pending_organizations), completed_at),
        )

    async def clear_pending(self, name: str) -> None:
        await self._conn.execute(
            sql.SQL("UPDATE {} SET pending_organizations = '{{}}' WHERE name = %s").format(self._checkpoints), (name,)
        )

    def _candidates(self, after: int | None, up_to: int | None, select: sql.Composable) -> sql.Composed:
        conditions: list[sql.Composable] = []
        if after is not None:
            conditions.append(sql.SQL("m.mention_id > {}").format(sql.Literal(after)))
        if up_to is not None:
            conditions.append(sql.SQL("m.mention_id <= {}").format(sql.Literal(up_to)))
        if self._organizations:
            conditions.append(sql.SQL("m.organization_id = ANY({}::bigint[])").format(sql.Literal(self._organizations)))
        where = sql.SQL(" AND ").join(conditions) if conditions else sql.SQL("true")
        return sql.SQL(_PRUNE_CANDIDATES).format(select=select, mentions=self._mentions, conditions=where)
