"""The Postgres read model: apply a batch of changes under the version guard (docs/ordering.md).

A batch is folded into one write per mention (``registers.fold``) and written by the statement
shared with the backfill (``merge``): the row follows the highest-version change, and
``organization_id`` and ``mention_date`` each follow the highest-version change that carried
them, so a change that leaves a field out (a Delete without organization, a change without
date) gives the same table in any delivery order.  The guard is evaluated by Postgres on the
locked current row, never by reading first and deciding in Python, so two indexers racing on the
same mentions converge on the same row.

A Delete that names no organization (0 is protobuf's "not set" and means the same) of a mention
never seen before leaves a tombstone in organization 0, which is never reported for cache
invalidation; the first change that carries an organization moves it.

Callers must pass every change, not a ``changes.coalesce``-d batch: coalescing drops a lower
change that may carry a field the newest one left out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

import psycopg
from psycopg import sql

from indexer.changes import Change, touched_organizations, version_bytes
from indexer.errors import Refused, Unavailable
from indexer.readmodel import arrays
from indexer.readmodel.connection import close_quietly, connection_options, translate_errors
from indexer.readmodel.merge import merge_statement
from indexer.readmodel.outbox import Outbox
from indexer.readmodel.registers import fold

log = logging.getLogger(__name__)

# Placeholder organization of a tombstone whose Deletes named none (see module docstring).
UNKNOWN_ORGANIZATION = 0
# The live path never idles inside a transaction: one statement, then commit.
IDLE_IN_TRANSACTION_TIMEOUT_S = 10

_INCOMING = """
unnest(%s::bigint[], %s::bytea[], %s::timestamptz[], %s::smallint[],
       %s::bigint[], %s::bytea[], %s::timestamptz[], %s::bytea[])
    AS c(mention_id, version, transaction_timestamp, change_kind,
         organization_id, organization_version, mention_date, mention_date_version)
"""

# A batch is one statement, so one round trip and no BEGIN/COMMIT of its own (each statement costs
# the live path ~0.1 ms of CPU in psycopg's async wait, more than the network here):
# * ``written``: the merge (``merge``), returning what it wrote;
# * ``stored``: for mentions it did not write (duplicates, stale), the organizations the stored row
#   is in and came from, so a redelivery whose first delivery lost its invalidation still
#   invalidates (docs/caches.md).  It reads the statement's snapshot: a row it does not see was
#   committed by a concurrent writer after it began, and that writer invalidates it;
# * ``settled``: the outbox rows of earlier batches whose invalidations are done (``settled``);
# * ``owed``: this batch's outbox row, committed with it (``outbox``): what the caches are owed
#   survives a death right after the commit.  ``ApplyResult.organizations`` is read from it.
_APPLY = """
WITH written AS ({merge}),
stored AS (
    SELECT s.mention_id, s.version, s.organization_id, s.previous_organization_id
    FROM {mentions} AS s
    WHERE s.mention_id = ANY(%s::bigint[]) AND s.mention_id NOT IN (SELECT mention_id FROM written)
),
result AS (SELECT * FROM written UNION ALL SELECT * FROM stored),
settled AS (DELETE FROM {outbox} WHERE id = ANY(%s::bigint[])),
owed AS (
    INSERT INTO {outbox} (organizations)
    SELECT array_agg(DISTINCT o ORDER BY o)
    FROM (SELECT unnest(%s::bigint[])
          UNION ALL SELECT organization_id FROM result
          UNION ALL SELECT previous_organization_id FROM result) AS t(o)
    WHERE o IS NOT NULL AND o <> {unknown}
    HAVING count(*) > 0
    RETURNING id, organizations
)
SELECT 'written', mention_id, version, NULL::bigint[] FROM written
UNION ALL SELECT 'stored', mention_id, version, NULL FROM stored
UNION ALL SELECT 'owed', id, NULL, organizations FROM owed
"""
# Settled rows wait for the next batch's statement this long at most, then go on their own.
SETTLE_ALONE_AFTER_S = 1.0
SETTLE_AT_CLOSE_S = 1.0


@dataclass(frozen=True, slots=True)
class ApplyResult:
    applied: int
    """Mentions whose row now holds this batch's newest change for them (created or advanced)."""
    skipped: int
    """The other changes: stale, duplicate, or superseded within the batch.  A stale change may
    still have filled a field that every newer change left out (see ``registers``)."""
    organizations: frozenset[int]
    """Organizations whose caches must be invalidated, applied or not."""
    duplicate: int = field(default=0, compare=False)
    """Of ``skipped``: changes whose version the row already has."""
    stale: int = field(default=0, compare=False)
    """Of ``skipped``: changes older than the row (or than another change of the batch)."""
    applied_at: tuple[datetime, ...] = field(default=(), compare=False)
    """The ``transaction_timestamp`` of each applied change."""
    outbox_ids: tuple[int, ...] = field(default=(), compare=False)
    """The invalidation outbox rows this batch wrote (``settled`` once its caches are invalidated)."""


class Store:
    """The read model over ONE connection, opened lazily and reopened after a failure.

    The service applies one batch at a time; the settling of outbox rows in the background
    (``settled``) shares the connection under a lock.
    """

    def __init__(
        self, url: str, schema: str, *, connect_timeout_s: int = 5, settle_alone_after_s: float = SETTLE_ALONE_AFTER_S
    ) -> None:
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        mentions = sql.Identifier(schema, "mentions")
        self._outbox = Outbox(schema)
        self._apply = sql.SQL(_APPLY).format(
            merge=merge_statement(mentions, sql.SQL(_INCOMING), only_changed_fields=False),
            mentions=mentions,
            outbox=self._outbox.table,
            unknown=sql.Literal(UNKNOWN_ORGANIZATION),
        )
        self._conn: psycopg.AsyncConnection | None = None
        self._lock = asyncio.Lock()
        self._settle_alone_after_s = settle_alone_after_s
        self._unsettled: list[int] = []
        self._settling: asyncio.Task[None] | None = None

    async def apply(self, changes: Sequence[Change]) -> ApplyResult:
        """Apply a batch under the version guard and commit.

        Any batch is accepted, with duplicates and several changes per mention.  Raises
        ``Unavailable`` or ``Conflict``; in both cases nothing was committed and the batch can be
        retried as it is.  ``Refused`` when a value of the batch cannot be stored; the caller can
        apply the changes one by one to find the culprit.
        """
        try:
            writes = fold(changes)
        except ValueError as exc:  # an organization beyond int64 has no version
            raise Refused(f"unusable change: {exc}") from exc
        if not writes:
            return ApplyResult(0, 0, frozenset())
        newest = {w.mention_id: w.version for w in writes}
        async with self._lock:
            settling = list(self._unsettled)
            params = (
                arrays.bigints([w.mention_id for w in writes]),
                arrays.byteas([w.version for w in writes]),
                arrays.timestamptzs([w.transaction_timestamp for w in writes]),
                arrays.bigints([w.kind for w in writes]),
                arrays.bigints([w.organization_id for w in writes]),
                arrays.byteas([w.organization_version for w in writes]),
                arrays.timestamptzs([w.mention_date for w in writes]),
                arrays.byteas([w.mention_date_version for w in writes]),
                arrays.bigints(newest),
                arrays.bigints(settling),
                arrays.bigints(touched_organizations(changes)),
            )
            try:
                async with self._session() as conn:
                    cursor = await conn.execute(self._apply, params, binary=True)
                    rows = await cursor.fetchall()
            except (psycopg.DataError, psycopg.IntegrityError) as exc:
                # A value Postgres cannot take (e.g. an id beyond bigint): retrying cannot help.
                raise Refused(f"postgres refused the batch: {exc.sqlstate} {exc.diag.message_primary}") from exc
            del self._unsettled[: len(settling)]  # committed with the batch
        row_versions: dict[int, bytes] = {}
        unwritten = set(newest)
        outbox_ids: list[int] = []
        organizations: frozenset[int] = frozenset()
        for source, row_id, version, owed in rows:
            if source == "owed":
                outbox_ids.append(row_id)
                organizations = frozenset(owed)
                continue
            if source == "written":
                unwritten.discard(row_id)
            row_versions[row_id] = version
        result = _classified(changes, newest, row_versions, unwritten, organizations)
        return dataclasses.replace(result, outbox_ids=tuple(outbox_ids))

    async def settled(self, outbox_ids: Sequence[int]) -> None:
        """The caches owed by these outbox rows were invalidated: forget them, with the next
        batch's statement, or on their own if none comes within ``settle_alone_after_s``."""
        if not outbox_ids:
            return
        self._unsettled.extend(outbox_ids)
        if self._settling is None or self._settling.done():
            self._settling = asyncio.create_task(self._settle_alone_later(), name="indexer-outbox-settle")

    async def _settle_alone_later(self) -> None:
        await asyncio.sleep(self._settle_alone_after_s)
        try:
            await self._settle_now()
        except Unavailable as exc:
            # Left for the next batch's statement, or for the outbox sweep: one more invalidation at
            # worst, never a missed one.
            log.warning("invalidation outbox not cleared yet: %s", exc)

    async def _settle_now(self) -> None:
        async with self._lock:
            settling = list(self._unsettled)
            if settling:
                async with self._session() as conn:
                    await self._outbox.settle(conn, settling)
                del self._unsettled[: len(settling)]

    async def settle_owed(self, older_than_s: float, invalidate: Callable[[list[int]], Awaitable[object]]) -> int:
        """Invalidate (with ``invalidate``) what batches committed at least ``older_than_s`` ago
        still owe, and forget it; the number of outbox rows finished.  Rows another indexer is
        finishing meanwhile are skipped, not waited for."""
        async with self._session() as conn:
            return await self._outbox.settle_owed(conn, older_than_s, invalidate)

    async def ping(self) -> None:
        """Raise ``Unavailable`` unless Postgres answers a query."""
        async with self._lock, self._session() as conn:
            await conn.execute("SELECT 1")

    async def aclose(self) -> None:
        settling, self._settling = self._settling, None
        if settling is not None:
            settling.cancel()
            await asyncio.gather(settling, return_exceptions=True)
        # What is done need not be invalidated again by the sweep; but only over a connection that
        # is up, and briefly: a close during an outage must not spend the stop budget connecting.
        if self._unsettled and self._conn is not None and not self._conn.closed:
            try:
                async with asyncio.timeout(SETTLE_AT_CLOSE_S):
                    await self._settle_now()
            except (Unavailable, TimeoutError) as exc:
                log.warning("invalidation outbox not cleared at close (the sweep will): %s", exc or "timed out")
        await self._discard()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    @asynccontextmanager
    async def _session(self) -> AsyncIterator[psycopg.AsyncConnection]:
        """The store's connection, opened if needed; errors come out as ``Unavailable``/``Conflict``."""
        try:
            with translate_errors(self._url):
                if self._conn is None or self._conn.closed:
                    self._conn = await psycopg.AsyncConnection.connect(
                        self._url,
                        autocommit=True,
                        **connection_options(
                            self._connect_timeout_s, idle_in_transaction_timeout_s=IDLE_IN_TRANSACTION_TIMEOUT_S
                        ),
                    )
                yield self._conn
        except Unavailable:
            await self._discard()
            raise
        except BaseException:
            # Cancelled mid-statement (shutdown) or similar: the connection's state is unknown.
            if self._conn is not None and self._conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                await self._discard()
            raise

    async def _discard(self) -> None:
        conn, self._conn = self._conn, None
        await close_quietly(conn)


def _classified(
    changes: Sequence[Change],
    newest: dict[int, bytes],
    row_versions: dict[int, bytes],
    unwritten: set[int],
    organizations: frozenset[int],
) -> ApplyResult:
    """Each change as applied (the row now holds it, written by this batch: once per mention),
    duplicate (the row had its version already) or stale (the row is newer)."""
    applied_at: list[datetime] = []
    counted: set[int] = set()
    duplicate = stale = 0
    for change in changes:
        mention_id, version = change.mention_id, version_bytes(change)
        row_version = row_versions.get(mention_id)
        if row_version is None or version < row_version:
            stale += 1  # (None: a row gone meanwhile, e.g. a concurrent DROP; nothing to say of it)
        elif mention_id not in unwritten and mention_id not in counted and version == newest[mention_id]:
            counted.add(mention_id)
            applied_at.append(change.transaction_timestamp)
        else:
            duplicate += 1
    applied = len(applied_at)
    return ApplyResult(applied, len(changes) - applied, organizations, duplicate, stale, tuple(applied_at))
