"""A chunk's invalidation runs while the next chunk is merged: until it is done, its organizations
stay pending in the checkpoint that next chunk writes, so a run that dies meanwhile owes them."""

from __future__ import annotations

import io
from collections.abc import Iterable

import psycopg
import redis.asyncio
from psycopg import sql

from indexer.cache import CacheInvalidator
from indexer.config import Settings
from indexer.ops.backfill import Options, backfill
from tests.support.backfill import SourceRow, SourceTable
from tests.support.cache_fixtures import fill
from tests.support.clock import at
from tests.support.waiting import eventually

BATCH = 2


class HeldFirstInvalidation:
    """The real invalidator, whose first call waits until the next chunk has committed and then
    notes the checkpoint's pending organizations (what a death at that moment would leave owed)."""

    def __init__(self, cache: CacheInvalidator, settings: Settings) -> None:
        self._cache = cache
        self._settings = settings
        self.calls: list[list[int]] = []
        self.pending_while_held: list[int] | None = None

    async def start(self) -> None:
        await self._cache.start()

    async def invalidate(self, orgs: Iterable[int]) -> int:
        orgs = sorted(orgs)
        self.calls.append(orgs)
        if len(self.calls) == 1:
            await eventually(lambda: self._checkpoint_after(2 * BATCH), timeout_s=20, what="the next chunk committed")
            self.pending_while_held = await self._pending()
        return await self._cache.invalidate(orgs)

    async def _checkpoint_after(self, mention_id: int) -> bool:
        async with await psycopg.AsyncConnection.connect(self._settings.database_url) as conn:
            cursor = await conn.execute(
                sql.SQL("SELECT max(last_mention_id) FROM {}").format(
                    sql.Identifier(self._settings.schema_name, "backfill_checkpoints")
                )
            )
            row = await cursor.fetchone()
            return row is not None and row[0] is not None and row[0] >= mention_id

    async def _pending(self) -> list[int]:
        async with await psycopg.AsyncConnection.connect(self._settings.database_url) as conn:
            cursor = await conn.execute(
                sql.SQL("SELECT pending_organizations FROM {}").format(
                    sql.Identifier(self._settings.schema_name, "backfill_checkpoints")
                )
            )
            row = await cursor.fetchone()
            assert row is not None
            return sorted(row[0])


async def test_an_invalidation_in_flight_stays_pending_in_the_next_checkpoint(
    settings: Settings, source: SourceTable
) -> None:
    # Chunk 1 is organization 1's, chunk 2 organization 2's, chunk 3 organization 3's.
    source.insert(SourceRow(i, (i - 1) // BATCH + 1, at(i)) for i in range(1, 3 * BATCH))
    keys = [await fill(settings, org, "mentions") for org in (1, 2, 3)]
    options = Options(
        source_url=settings.source_url,
        target_url=settings.database_url,
        schema=settings.schema_name,
        query=source.query(),
        batch_size=BATCH,
        retry_initial_s=settings.retry_initial_s,
        retry_max_s=settings.retry_max_s,
    )
    async with CacheInvalidator.from_settings(settings) as cache:
        held = HeldFirstInvalidation(cache, settings)
        report = await backfill(options, held, progress_stream=io.StringIO())
    assert report.counts.read == 3 * BATCH - 1
    assert held.calls == [[1], [2], [3]]
    assert held.pending_while_held == [1, 2], "chunk 1's organizations were owed until its invalidation ended"
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        assert await client.exists(*keys) == 0
    finally:
        await client.aclose()
