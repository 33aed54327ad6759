"""One backfill run: checks, then chunk after chunk, each committed with its checkpoint and then
invalidated (see the package docstring for the rules).

The source is only ever read, whatever the query (``--source-query`` is the operator's SQL): it is
read through ``indexer.readmodel.source.SourceSession``, whose module doc says how.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Iterable
from contextlib import aclosing
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol, TextIO

import psycopg
from psycopg import sql

from indexer.errors import Conflict
from indexer.ops.backfill.errors import staging_errors, target_errors
from indexer.ops.backfill.target import COPY_INTO_STAGING, STAGING_INTO, Counts, Target
from indexer.ops.progress import Progress
from indexer.readmodel.connection import connection_options
from indexer.readmodel.migrate import migrate_async
from indexer.readmodel.source import Source, SourceSession, normalized, read_into, source_errors
from indexer.readmodel.source import source_connection_options as source_connection_options  # re-exported
from indexer.readmodel.source_run import SourceRun
from indexer.retry import retry_transient

log = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 5
_COPY_BLOCK_BYTES = 256 * 1024
_CONFLICT_ATTEMPTS = 5  # a chunk aborted by Postgres (e.g. a standby's recovery conflict) is re-read


class Invalidator(Protocol):
    async def start(self) -> None: ...
    async def invalidate(self, orgs: Iterable[int]) -> int: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Options(SourceRun):
    target_url: str
    batch_size: int = 10_000
    prune: bool = False
    resume: bool = False
    dry_run: bool = False


@dataclass(frozen=True, slots=True)
class Report:
    counts: Counts
    elapsed_s: float
    dry_run: bool
    resumed_after: int | None

    def summary(self) -> str:
        c = self.counts
        rate = c.read / self.elapsed_s if self.elapsed_s > 0 else 0.0
        head = "backfill (dry run, nothing changed)" if self.dry_run else "backfill"
        if self.resumed_after is not None:
            head += f" (resumed after mention {self.resumed_after})"
        return (
            f"{head}: read {c.read}, inserted {c.inserted}, updated {c.updated}, unchanged {c.unchanged},"
            f" stale-skipped {c.stale}, tombstoned {c.tombstoned}; {rate:,.0f} rows/s in {self.elapsed_s:.1f} s"
        )


async def backfill(options: Options, cache: Invalidator, *, progress_stream: TextIO = sys.stderr) -> Report:
    """Run a backfill to its end; raises ``ConfigError`` (bad query or schema), ``Unavailable``."""
    query = normalized(options.query)
    if not options.dry_run:
        await migrate_async(options.target_url, options.schema)
        # Starts the cache's key tracker (its one SCAN) now, not inside the first invalidation.
        await retry_transient(cache.start, what="redis", initial_s=options.retry_initial_s, max_s=options.retry_max_s)
    source = await SourceSession.connect(options.source_url)
    try:
        with target_errors(options.target_url, options.schema):
            target_conn = await _connect(options.target_url)
        try:
            run = _Run(options, query, source, target_conn, cache)
            return await run.all(progress_stream)
        finally:
            await target_conn.close()
    finally:
        await source.close()


async def _connect(url: str) -> psycopg.AsyncConnection:
    return await psycopg.AsyncConnection.connect(url, autocommit=True, **connection_options(_CONNECT_TIMEOUT_S))


class _Run:
    def __init__(
        self,
        options: Options,
        query: str,
        source: SourceSession,
        target_conn: psycopg.AsyncConnection,
        cache: Invalidator,
    ) -> None:
        self._options = options
        self._query = query
        self._session = source
        self._src = source.conn
        self._tgt = target_conn
        self._cache = cache
        self._source: Source
        self._target: Target
        # The same URL: the same database and role, so the read model's session can read it too.
        self._in_place = options.source_url == options.target_url

    async def all(self, progress_stream: TextIO) -> Report:
        options = self._options
        self._source = await self._session.open(self._query, options.organizations)
        self._target = Target(self._tgt, options.schema, self._source.organizations)
        name, description = self._source.checkpoint_name(options.source_url)

        with target_errors(options.target_url, options.schema):
            await self._target.prepare()
            if not options.dry_run:
                await self._target.lock(name)
            checkpoint = await self._target.checkpoint(name)
        if checkpoint is not None and checkpoint.pending_organizations and not options.dry_run:
            # The previous run may have died between a commit and its invalidation.
            await self._invalidate(checkpoint.pending_organizations)
        after = None
        if options.resume and checkpoint is not None and not checkpoint.completed:
            after = checkpoint.last_mention_id
            log.info("resuming %s after mention %s", name, after)
        elif options.resume:
            log.info("nothing to resume for %s: starting over", name)
        if not options.dry_run and after is None:
            with target_errors(options.target_url, options.schema):
                await self._target.record(name, description, None, None, (), None)
        resumed_after = after

        with source_errors(options.source_url):
            async with self._src.transaction():
                cursor = await self._session.checked(self._source.count(after))
                row = await cursor.fetchone()
        progress = Progress("backfill", row[0] if row else None, progress_stream)
        total = Counts()
        # A chunk's invalidation runs while the next chunk is read and merged (Redis beside
        # Postgres); until it is done its organizations stay pending in every checkpoint written.
        invalidating: asyncio.Task[None] | None = None
        in_flight: frozenset[int] = frozenset()
        try:
            while True:
                counts, after, final = await self._chunk_retrying(name, description, after, in_flight)
                total.add(counts)
                progress.advance(counts.read)
                if invalidating is not None:
                    await invalidating
                    invalidating, in_flight = None, frozenset()
                if not options.dry_run and counts.organizations:
                    in_flight = frozenset(counts.organizations)
                    invalidating = asyncio.create_task(self._invalidate(in_flight), name="backfill-invalidation")
                if final:
                    break
            if invalidating is not None:
                await invalidating
                invalidating = None
            if not options.dry_run:
                with target_errors(options.target_url, options.schema):
                    await self._target.clear_pending(name)
        finally:
            if invalidating is not None:  # the run failed: what it owes stays pending in the checkpoint
                invalidating.cancel()
                await asyncio.gather(invalidating, return_exceptions=True)
            progress.close()
        return Report(total, progress.elapsed_s, options.dry_run, resumed_after)

    async def _invalidate(self, organizations: Iterable[int]) -> None:
        orgs = sorted(organizations)
        await retry_transient(
            lambda: self._cache.invalidate(orgs),
            what="redis",
            initial_s=self._options.retry_initial_s,
            max_s=self._options.retry_max_s,
        )

    async def _chunk_retrying(
        self, name: str, description: str, after: int | None, owed: frozenset[int]
    ) -> tuple[Counts, int | None, bool]:
        for attempt in range(1, _CONFLICT_ATTEMPTS + 1):
            try:
                return await self._chunk(name, description, after, owed)
            except Conflict as exc:
                if attempt == _CONFLICT_ATTEMPTS:
                    raise
                log.warning("chunk after mention %s aborted (attempt %d), reading it again: %s", after, attempt, exc)
        raise AssertionError("unreachable")

    async def _chunk(
        self, name: str, description: str, after: int | None, owed: frozenset[int]
    ) -> tuple[Counts, int | None, bool]:
        """Read, merge and (unless a dry run) commit the rows after ``after``; the chunk's counts,
        the mention to continue after, and whether this was the last chunk.  ``owed``: the
        organizations of an invalidation not known to be done, kept pending with this chunk's."""
        options, source, target = self._options, self._source, self._target
        with target_errors(options.target_url, options.schema):
            await target.clear_staging()
        # One database: the chunk goes from the source query into the staging table in SQL.  A
        # scoped prune looks moved mentions up in the chunk's snapshot, which only the source
        # session holds: that case relays.
        in_place = self._in_place and not (options.prune and source.organizations)
        staged_at: datetime | None = None
        if in_place:
            with source_errors(options.source_url), staging_errors():
                staged_at = await read_into(self._tgt, source.chunk(after, options.batch_size), STAGING_INTO)
        with source_errors(options.source_url):
            async with (
                self._session.snapshot() if staged_at is None else contextlib.nullcontext(staged_at) as snapshot_at
            ):
                with target_errors(options.target_url, options.schema):
                    async with self._tgt.transaction(force_rollback=options.dry_run):
                        if not in_place:
                            await self._copy(source.chunk(after, options.batch_size))
                        read, last = await target.staged()
                        final = read < options.batch_size
                        # The chunk covers (after, last]; the last one also the tail after it.
                        up_to = None if final else last
                        if options.prune:
                            if source.organizations:
                                moved = await target.prune_candidates(after, up_to)
                                if moved:  # gone from the scope, maybe not from the source
                                    await self._copy(source.lookup(moved))
                                    read, _ = await target.staged()
                            await target.stage_tombstones(after, up_to, snapshot_at)
                        counts = await target.merge()
                        counts.read = read
                        if last is not None and (after is None or last > after):
                            after = last
                        if not options.dry_run:
                            completed_at = datetime.now(UTC) if final else None
                            pending = sorted(counts.organizations | owed)
                            await target.record(name, description, after, snapshot_at, pending, completed_at)
        return counts, after, final

    async def _copy(self, rows: sql.Composable) -> None:
        """Stream ``rows`` from the source into the staging table, binary and unparsed."""
        async with self._tgt.cursor().copy(COPY_INTO_STAGING) as into:
            async with aclosing(self._session.copy_out(rows)) as chunks:
                # The source hands over one row at a time: written in blocks, the relay costs a
                # call per block instead of one per row.
                block = bytearray()
                async for data in chunks:
                    block += data
                    if len(block) >= _COPY_BLOCK_BYTES:
                        await into.write(block)
                        block = bytearray()
                if block:
                    await into.write(block)
