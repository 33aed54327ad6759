"""A backfill running while the live path applies later changes to the same mentions ends with the
table that applying the source snapshot and the live changes in version order gives."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone

import pytest

from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.readmodel.store import Store
from tests.support.amqp import ready_count
from tests.support.backfill import SourceRow, SourceTable, run_backfill
from tests.support.clock import at
from tests.support.service import acknowledged, publish_changes, running
from tests.support.store import Row, aread_table, oracle, read_table

SOURCE_ROWS = 3000
LIVE_BATCHES = 60
LIVE_BATCH_SIZE = 50
# Stands for "the snapshot's time" in the oracle: below every live change, as the real one is.
SNAPSHOT = datetime(2000, 1, 1, tzinfo=timezone.utc)


def live_changes(rng: random.Random, later_than: datetime) -> list[Change]:
    changes = []
    for _ in range(LIVE_BATCHES * LIVE_BATCH_SIZE):
        kind = rng.choice(list(Kind))
        changes.append(
            Change(
                kind,
                rng.randint(1, SOURCE_ROWS + 200),  # some mentions the source does not have
                None if kind is Kind.DELETED and rng.random() < 0.5 else rng.randint(1, 6),
                None if rng.random() < 0.3 else at(rng.randint(0, 9)),
                later_than + timedelta(microseconds=rng.randint(1, 5000)),
            )
        )
    return changes


def assert_oracle(got: dict[int, Row], expected: dict[int, Row], started: datetime, finished: datetime) -> None:
    """``got`` is the oracle's table, where a backfilled row that is the newest carries the time of
    its snapshot, taken while the backfill ran, for ``SNAPSHOT``."""
    assert got.keys() == expected.keys()
    for mention_id, want in expected.items():
        row = got[mention_id]
        if want.transaction_timestamp == SNAPSHOT:  # the backfilled row is the newest
            assert started <= row.transaction_timestamp <= finished
            row = row._replace(transaction_timestamp=SNAPSHOT)
        assert row == want, mention_id


@pytest.mark.slow
async def test_backfill_racing_live_changes_converges_on_the_oracle(settings: Settings, source: SourceTable) -> None:
    rng = random.Random(4242)
    source_rows = [
        SourceRow(i, rng.randint(1, 6), None if rng.random() < 0.2 else at(rng.randint(0, 9)), removed=rng.random() < 0.1)
        for i in range(1, SOURCE_ROWS + 1)
    ]
    source.insert(source_rows)
    started = datetime.now(timezone.utc)
    live = live_changes(rng, later_than=started + timedelta(hours=1))

    applied_batches = 0

    async def apply_live() -> None:
        nonlocal applied_batches
        async with Store(settings.database_url, settings.schema_name) as store:
            for start in range(0, len(live), LIVE_BATCH_SIZE):
                await store.apply(live[start : start + LIVE_BATCH_SIZE])
                applied_batches += 1
                await asyncio.sleep(rng.random() * 0.01)

    async def backfill_then_count() -> int:
        await run_backfill(settings, source.query(deleted=True), batch_size=100, prune=True)
        return applied_batches

    batches_during_backfill, _ = await asyncio.gather(backfill_then_count(), apply_live())
    finished = datetime.now(timezone.utc)
    # They did overlap: the live path was mid-way when the backfill ended.
    assert 0 < batches_during_backfill < LIVE_BATCHES

    backfilled = [
        Change(Kind.DELETED if r.removed else Kind.INSERTED, r.id, r.org, r.happened_at, SNAPSHOT) for r in source_rows
    ]
    assert_oracle(read_table(settings.database_url, settings.schema_name), oracle(backfilled + live), started, finished)


@pytest.mark.slow
async def test_backfill_while_run_consumes_a_live_stream_converges_on_the_oracle(
    settings: Settings, source: SourceTable
) -> None:
    """The same race end to end: the live changes travel through RabbitMQ to the running service."""
    rng = random.Random(777)
    rows = [SourceRow(i, rng.randint(1, 6), at(rng.randint(0, 9))) for i in range(1, 1001)]
    source.insert(rows)
    started = datetime.now(timezone.utc)
    live = live_changes(rng, later_than=started + timedelta(hours=1))[:1500]

    async with running(settings) as service:
        publishing = asyncio.create_task(publish_changes(settings, live))
        await run_backfill(settings, source.query(), batch_size=50)
        finished = datetime.now(timezone.utc)
        backfill_ended_while_publishing = not publishing.done()
        await publishing
        await acknowledged(service, len(live), timeout_s=60)
        got = await aread_table(settings.database_url, settings.schema_name)
    backfilled = [Change(Kind.INSERTED, r.id, r.org, r.happened_at, SNAPSHOT) for r in rows]
    assert_oracle(got, oracle(backfilled + live), started, finished)
    assert backfill_ended_while_publishing, "the backfill and the live stream did not overlap"
    assert await ready_count(settings.amqp_url, settings.dlq) == 0
