"""The invalidation outbox: an invalidation that a dead indexer owed is finished by another one.

The case it exists for (two indexers, one queue): indexer 1 commits a move A→B and dies before
invalidating; indexer 2 moves the mention B→C; the first message, redelivered, is stale and names
B and C only.  Without the outbox nothing ever invalidates A.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import psycopg
import redis.asyncio
from psycopg import sql

from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.readmodel.migrate import migrate_async
from indexer.readmodel.store import SETTLE_ALONE_AFTER_S, Store
from tests.support.cache_fixtures import fill
from tests.support.service import acknowledged, publish_changes, running
from tests.support.waiting import eventually

A, B, C = 101, 102, 103
T = datetime(2026, 3, 1, tzinfo=UTC)


def _move(to_org: int, seconds: int) -> Change:
    return Change(Kind.UPDATED, 1, to_org, None, T + timedelta(seconds=seconds))


async def _owed(settings: Settings) -> int:
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        table = sql.Identifier(settings.schema_name, "invalidation_outbox")
        cursor = await conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table))
        row = await cursor.fetchone()
        return int(row[0]) if row else 0


async def _owed_ids(settings: Settings) -> list[int]:
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        table = sql.Identifier(settings.schema_name, "invalidation_outbox")
        cursor = await conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(table))
        return [row[0] for row in await cursor.fetchall()]


async def _owed_organizations(settings: Settings, outbox_id: int) -> list[int]:
    async with await psycopg.AsyncConnection.connect(settings.database_url) as conn:
        table = sql.Identifier(settings.schema_name, "invalidation_outbox")
        cursor = await conn.execute(sql.SQL("SELECT organizations FROM {} WHERE id = %s").format(table), (outbox_id,))
        row = await cursor.fetchone()
        assert row is not None
        return list(row[0])


async def _exists(settings: Settings, key: str) -> bool:
    client = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        return bool(await client.exists(key))
    finally:
        await client.aclose()


async def _indexer_1_commits_a_to_b_and_dies(settings: Settings) -> str:
    """A's cache is filled from the row in A; then indexer 1 commits the move, never invalidates."""
    await migrate_async(settings.database_url, settings.schema_name)
    async with Store(settings.database_url, settings.schema_name) as store:
        first = await store.apply([Change(Kind.INSERTED, 1, A, None, T)])
        await store.settled(first.outbox_ids)  # a healthy batch: nothing owed
        key = await fill(settings, A, "mentions")
        result = await store.apply([_move(B, 1)])
    assert result.outbox_ids and await _owed(settings) == 1
    return key


async def test_the_a_b_c_case_invalidates_a(settings: Settings) -> None:
    key_of_a = await _indexer_1_commits_a_to_b_and_dies(settings)
    assert await _exists(settings, key_of_a)
    async with running(settings) as indexer_2:  # starts by finishing what was owed
        await publish_changes(settings, [_move(C, 2), _move(B, 1)])  # B→C, then the redelivered A→B
        await acknowledged(indexer_2, 2)
        await eventually(lambda: _gone(settings, key_of_a), what="A's cache invalidated")
        await eventually(lambda: _none_owed(settings), what="the outbox empty")


async def test_a_running_indexer_finishes_what_another_left_owing(settings: Settings) -> None:
    quick = settings.model_copy(update={"outbox_age_s": 1.0})
    async with running(quick):
        key_of_a = await _indexer_1_commits_a_to_b_and_dies(quick)  # meanwhile, beside it
        assert await _exists(quick, key_of_a), "a row younger than INDEXER_OUTBOX_AGE_S is left alone"
        await eventually(lambda: _gone(quick, key_of_a), timeout_s=10, what="A's cache invalidated by the sweep")
        await eventually(lambda: _none_owed(quick), what="the outbox empty")


async def test_a_batch_settles_its_own_row(settings: Settings) -> None:
    async with running(settings) as indexer:
        await publish_changes(settings, [Change(Kind.INSERTED, 5, A, None, T)])
        await acknowledged(indexer, 1)
        # No batch follows: the row goes on its own, well before any sweep would take it.
        await eventually(lambda: _none_owed(settings), timeout_s=3 * SETTLE_ALONE_AFTER_S, what="the outbox empty")


async def test_a_settled_row_goes_with_the_next_batch(settings: Settings) -> None:
    await migrate_async(settings.database_url, settings.schema_name)
    async with Store(settings.database_url, settings.schema_name, settle_alone_after_s=3600) as store:
        first = await store.apply([Change(Kind.INSERTED, 1, A, None, T)])
        await store.settled(first.outbox_ids)
        assert await _owed(settings) == 1, "not on its own within the hour"
        second = await store.apply([Change(Kind.INSERTED, 2, B, None, T)])
        assert await _owed_ids(settings) == list(second.outbox_ids), "the first went with the second batch"


async def test_what_is_settled_is_cleared_at_close(settings: Settings) -> None:
    await migrate_async(settings.database_url, settings.schema_name)
    async with Store(settings.database_url, settings.schema_name, settle_alone_after_s=3600) as store:
        first = await store.apply([Change(Kind.INSERTED, 1, A, None, T)])
        await store.settled(first.outbox_ids)
    assert await _owed(settings) == 0


async def test_the_outbox_row_names_what_the_batch_reports(settings: Settings) -> None:
    """The row written by the batch's statement and the organizations returned to the caller are
    one set: the new ones, the ones moved away from, and those of rows the batch did not write."""
    await migrate_async(settings.database_url, settings.schema_name)
    async with Store(settings.database_url, settings.schema_name, settle_alone_after_s=3600) as store:
        await store.apply([Change(Kind.INSERTED, 1, A, None, T), Change(Kind.INSERTED, 2, B, None, T)])
        result = await store.apply(
            [_move(C, 1), Change(Kind.INSERTED, 2, B, None, T), Change(Kind.DELETED, 3, None, None, T)]
        )
    (outbox_id,) = result.outbox_ids
    assert result.organizations == {A, B, C}
    assert await _owed_organizations(settings, outbox_id) == [A, B, C]


async def _gone(settings: Settings, key: str) -> bool:
    return not await _exists(settings, key)


async def _none_owed(settings: Settings) -> bool:
    return await _owed(settings) == 0
