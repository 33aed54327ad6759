"""``mention-indexer run`` as a subprocess under faults, on the real services: nothing acknowledged
is lost, nothing is left unacknowledged, SIGTERM exits 0 within 10 s, memory stays bounded.

The services are never stopped (others use them): the indexer reaches each one through a
``TcpProxy`` that the test cuts and restores.  Producers publish straight to the real broker.

Where it can be checked exactly (no consumer attached, publisher paused) every test checks the
at-least-once invariant: whatever left the queue was committed (``assert_acked_were_committed``).
At the end, the table equals the oracle (per mention, the change with the highest version), the
queue is empty once the indexer has stopped (so nothing was left unacknowledged) and the DLQ is
empty.  Histories are random; the seed is printed (set ``FAULT_SEED`` to replay one).

Faults: kill -9 (also during start-up); Postgres cut, and half-open; Redis
cut with caches filled meanwhile; broker connection reset, broker unreachable (connects hang),
consumer cancelled by the broker; SIGTERM mid-stream, with a batch stuck on Postgres, and with the
broker stalled too; memory with 20k messages piled up behind a stuck batch.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import redis

from indexer.cache import CacheReader, data_key, stored_value
from indexer.changes import Kind
from indexer.config import Settings
from tests.support.amqp import delete_queue, queue_state
from tests.support.indexer_process import IndexerProcess
from tests.support.proxy import TcpProxy
from tests.support.store import Row, aread_table, change, oracle
from tests.support.stream import Publisher, assert_acked_were_committed, history, remaining_ids
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

ORGS = list(range(1, 21))


@dataclass
class Harness:
    settings: Settings  # the test's own names, direct URLs
    tmp_path: Path
    rng: random.Random
    postgres: TcpProxy
    redis: TcpProxy
    amqp: TcpProxy
    processes: list[IndexerProcess] = field(default_factory=list)

    def indexer(self, *, via: tuple[str, ...] = (), **overrides: object) -> IndexerProcess:
        """An indexer (not started) whose connections to the services named in ``via`` go
        through their proxy."""
        update: dict[str, object] = dict(overrides)
        if "postgres" in via:
            update["database_url"] = self.postgres.url(self.settings.database_url)
        if "redis" in via:
            update["redis_url"] = self.redis.url(self.settings.redis_url)
        if "rabbitmq" in via:
            update["amqp_url"] = self.amqp.url(self.settings.amqp_url)
        process = IndexerProcess(
            self.settings.model_copy(update=update), self.tmp_path / f"indexer-{len(self.processes)}.log"
        )
        self.processes.append(process)
        return process

    async def table(self) -> dict[int, Row]:
        return await aread_table(self.settings.database_url, self.settings.schema_name)

    async def check_invariant(self, publisher: Publisher) -> int:
        """No consumer attached and the publisher paused: acked ⇒ committed.  Returns #acked."""
        remaining = await remaining_ids(self.settings)
        return assert_acked_were_committed(publisher.confirmed, remaining, await self.table())

    async def drained_and_stopped(self, process: IndexerProcess, publisher: Publisher, timeout_s: float = 60) -> None:
        """The end state: table == oracle, then a clean stop leaves the queue and the DLQ empty."""
        await publisher.finished()
        expected = oracle(publisher.changes)

        async def converged() -> bool:
            if not process.running:
                raise AssertionError(f"indexer exited\n{process.tail()}")
            ready, _ = await queue_state(self.settings.amqp_url, self.settings.queue)
            return ready == 0 and await self.table() == expected

        try:
            await eventually(converged, timeout_s=timeout_s, interval_s=0.2)
        except AssertionError:
            table = await self.table()
            wrong = [m for m in expected if table.get(m) != expected[m]]
            raise AssertionError(
                f"table != oracle for {len(wrong)} of {len(expected)} mentions, e.g. "
                + "; ".join(f"{m}: {table.get(m)} != {expected[m]}" for m in wrong[:3])
                + f"\n{process.tail()}"
            ) from None
        await idle(process)
        code, elapsed = await asyncio.to_thread(process.terminate)
        assert code == 0, process.tail()
        assert elapsed < 10, f"SIGTERM to exit took {elapsed:.1f}s"
        left = await remaining_ids(self.settings)  # once its consumer is gone
        assert not left, f"{len(left)} messages were left unacknowledged\n{process.tail()}"
        dead, _ = await queue_state(self.settings.amqp_url, self.settings.dlq)
        assert dead == 0, f"{dead} messages were dead-lettered\n{process.tail()}"


async def idle(process: IndexerProcess, quiet_s: float = 0.5) -> None:
    """Until the indexer has finished no batch for ``quiet_s`` (nothing in hand)."""
    last = None
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < quiet_s:
        batches = (await asyncio.to_thread(process.metrics))["mention_indexer_batches_total"]
        if batches != last:
            last, quiet_since = batches, time.monotonic()
        await asyncio.sleep(0.1)


@pytest.fixture
def harness(settings: Settings, tmp_path: Path) -> Iterator[Harness]:
    seed = int(os.environ.get("FAULT_SEED") or random.randrange(2**32))
    print(f"FAULT_SEED={seed}  logs in {tmp_path}")
    proxies = [TcpProxy.for_url(url).start() for url in (settings.database_url, settings.redis_url, settings.amqp_url)]
    h = Harness(settings, tmp_path, random.Random(seed), *proxies)
    try:
        yield h
    finally:
        for process in h.processes:
            process.stop()
        for proxy in proxies:
            proxy.close()
        for process in h.processes:  # shown by pytest for a failed test only
            print(process.tail(200))


async def some_progress(h: Harness, rows: int = 50) -> None:
    async def enough() -> bool:
        return len(await h.table()) >= rows

    await eventually(enough, what=f"{rows} rows")


async def consuming(settings: Settings) -> bool:
    """The queue has its one consumer (again)."""
    return (await queue_state(settings.amqp_url, settings.queue))[1] == 1


# ---- 1. kill -9 ---------------------------------------------------------------------------------


async def test_kill_9_at_random_moments_loses_nothing(harness: Harness) -> None:
    h = harness
    stream = history(h.rng, range(1, 401), ORGS)
    # Postgres 40 ms away (a round trip): a batch spends most of its life in round trips, so a
    # kill at a random moment usually finds one in hand (between delivery and ack).
    h.postgres.latency_s = 0.02
    indexer = h.indexer(via=("postgres",))
    await indexer.start_ready()
    acked = []
    async with Publisher(h.settings) as publisher:
        publisher.start(stream, chunk=20, interval_s=0.04)
        for kill in range(4):
            await asyncio.sleep(h.rng.uniform(0.2, 1.0))
            indexer.kill()
            await publisher.pause()
            assert len(publisher.confirmed) < len(stream), "the kills were not mid-stream"
            acked.append(await h.check_invariant(publisher))
            publisher.resume()  # a backlog builds up while it restarts
            if kill == 1:
                # Once while starting up (migrating, connecting), before it is even ready.
                indexer.start(wait_ready=False)
                await asyncio.sleep(h.rng.uniform(0.0, 0.8))
                indexer.kill()
            await indexer.start_ready()
        print(f"acknowledged at each kill: {acked} of {len(stream)}")
        assert acked[-1] > 0
        await h.drained_and_stopped(indexer, publisher)


# ---- 2. Postgres --------------------------------------------------------------------------------


async def test_postgres_outage_is_waited_out_without_acknowledging(harness: Harness) -> None:
    h = harness
    stream = history(h.rng, range(1, 301), ORGS)
    indexer = h.indexer(via=("postgres", "rabbitmq"))
    await indexer.start_ready()
    async with Publisher(h.settings) as publisher:
        publisher.start(stream, chunk=20, interval_s=0.02)
        await some_progress(h)
        h.postgres.cut()
        problems = await indexer.wait_status(503, timeout_s=10)
        assert "postgres" in problems["problems"]  # type: ignore[operator]
        frozen = await h.table()
        await asyncio.sleep(1.5)  # retrying meanwhile, with more messages arriving
        assert indexer.running and await h.table() == frozen
        # Take the indexer's deliveries back from it (as a broker connection loss would) so that
        # what it acknowledged can be told exactly: all of it must be committed.
        h.amqp.cut()
        await publisher.pause()
        acked = await h.check_invariant(publisher)
        assert 0 < acked < len(publisher.confirmed)
        h.amqp.restore()
        publisher.resume()
        await eventually(lambda: consuming(h.settings), what="consuming again")  # reconnected to the broker ...
        assert (await asyncio.to_thread(indexer.readyz) or (0,))[0] == 503  # ... still waiting for Postgres
        h.postgres.restore()
        await indexer.wait_ready(timeout_s=15)
        assert indexer.starts == 1  # resumed by itself
        await h.drained_and_stopped(indexer, publisher)


async def test_postgres_half_open_connection_does_not_block_the_indexer(harness: Harness) -> None:
    """A partition the indexer noticed and Postgres did not: the old session keeps its transaction
    open; once the network is back the indexer must still make progress."""
    h = harness
    stream = history(h.rng, range(1, 301), ORGS)
    h.postgres.latency_s = 0.02  # a transaction stays open a while between its statements
    indexer = h.indexer(via=("postgres",))
    await indexer.start_ready()
    async with Publisher(h.settings) as publisher:
        publisher.start(stream, chunk=20, interval_s=0.02)
        await some_progress(h)
        for _ in range(20):
            await eventually(lambda: open_transactions(h.settings), timeout_s=10, what="a transaction open")
            h.postgres.cut(half_open=True)
            if await open_transactions(h.settings):
                break  # cut in the middle of a transaction, as intended
            h.postgres.restore()
            await indexer.wait_ready(timeout_s=15)
        else:
            raise RuntimeError("could not cut the connection in the middle of a transaction")
        await indexer.wait_status(503, timeout_s=10)
        h.postgres.restore()
        await h.drained_and_stopped(indexer, publisher, timeout_s=40)


async def open_transactions(settings: Settings) -> int:
    """The indexer's sessions now inside a transaction on this test's schema."""
    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as conn:
        cursor = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'mention-indexer'"
            " AND xact_start IS NOT NULL AND query LIKE %s",
            (f"%{settings.schema_name}%",),
        )
        row = await cursor.fetchone()
    return int(row[0]) if row else 0


# ---- 3. Redis -----------------------------------------------------------------------------------


async def test_redis_outage_holds_acks_until_caches_are_invalidated(harness: Harness) -> None:
    h = harness
    s = h.settings
    stream = history(h.rng, range(1, 301), ORGS)
    outage_orgs = [101, 102, 103, 104]  # changed only by messages published during the outage
    untouched_org = 999  # changed by nothing
    indexer = h.indexer(via=("redis",))
    await indexer.start_ready()
    direct = redis.Redis.from_url(s.redis_url)
    reader = CacheReader(s.redis_url, s.cache_prefix)  # readers reach the real Redis, not the proxy
    try:
        async with Publisher(s) as publisher:
            publisher.start(stream, chunk=20, interval_s=0.02)
            await some_progress(h)
            h.redis.cut()
            problems = await indexer.wait_status(503, timeout_s=10)
            assert "redis" in problems["problems"]  # type: ignore[operator]

            # Readers fill caches while the indexer cannot invalidate...
            keys = {org: data_key(s.cache_prefix, org, "list") for org in [*ORGS, *outage_orgs, untouched_org]}
            for org in keys:
                reader.get_or_fill(org, "list", lambda: b"cached during the outage")
            filled_at = time.monotonic()
            assert all(direct.exists(key) for key in keys.values())
            # ...then changes arrive for the outage organizations: new mentions, and moves of
            # existing ones (later than anything in the stream, so they stick).
            t_s = 10_000
            outage = [change(Kind.INSERTED, 10_000 + i, outage_orgs[i % 4], ts_s=t_s) for i in range(40)]
            outage += [change(Kind.UPDATED, m, outage_orgs[m % 4], ts_s=t_s) for m in range(1, 301, 37)]
            await publisher.publish_now(outage)
            await asyncio.sleep(1.5)  # retrying meanwhile, with more messages arriving
            assert indexer.running
            h.redis.restore()
            await indexer.wait_ready(timeout_s=15)
            assert indexer.starts == 1  # resumed by itself
            await h.drained_and_stopped(indexer, publisher)

        changed_after_fill = {
            publisher.confirmed[seq].organization_id
            for seq, at in publisher.confirmed_at.items()
            if at > filled_at
        }
        assert set(outage_orgs) <= changed_after_fill
        survived = sorted(org for org in changed_after_fill if direct.exists(keys[org]))
        assert not survived, f"caches of {survived} survived changes acknowledged after they were filled"
        assert stored_value(direct.get(keys[untouched_org]) or b"") == b"cached during the outage"
    finally:
        reader.close()
        direct.close()


# ---- 4. RabbitMQ --------------------------------------------------------------------------------


async def test_broker_connection_loss_consumer_is_registered_again(harness: Harness) -> None:
    h = harness
    stream = history(h.rng, range(1, 301), ORGS)
    indexer = h.indexer(via=("rabbitmq",))
    await indexer.start_ready()
    marker_id = 20_000
    async with Publisher(h.settings) as publisher:
        publisher.start(stream, chunk=20, interval_s=0.02)
        await some_progress(h)
        # "refuse": the broker is gone; "blackhole": it stops answering (connects hang).
        for mode in ("refuse", "blackhole"):
            accepted = h.amqp.accepted
            h.amqp.cut(mode)
            problems = await indexer.wait_status(503, timeout_s=10)
            assert "rabbitmq" in problems["problems"]  # type: ignore[operator]
            await publisher.pause()
            acked = await h.check_invariant(publisher)
            assert 0 < acked < len(publisher.confirmed)
            publisher.resume()
            await asyncio.sleep(1.0)  # producers go on publishing to the broker meanwhile
            h.amqp.restore()
            await indexer.wait_ready(timeout_s=20)
            assert h.amqp.accepted > accepted
            await eventually(lambda: consuming(h.settings), timeout_s=15, what="consuming again")
            # Consuming again: a change published now is applied.
            marker_id += 1
            await publisher.publish_now([change(Kind.INSERTED, marker_id, 1, ts_s=0.001)])

            async def marker_applied(marker_id: int = marker_id) -> bool:
                return marker_id in await h.table()

            await eventually(marker_applied, timeout_s=15, what=f"mention {marker_id} applied")
        assert indexer.starts == 1  # no restart
        await h.drained_and_stopped(indexer, publisher)


async def test_consumer_cancelled_by_the_broker_is_registered_again(harness: Harness) -> None:
    """The broker cancels a consumer without closing its channel (queue deleted, e.g. by an
    operator re-creating it): the session looks healthy but receives nothing.  The indexer must
    notice, declare its topology again and consume, with no restart."""
    h = harness
    before, after = history(h.rng, range(1, 101), ORGS), history(h.rng, range(101, 201), ORGS)
    indexer = h.indexer()
    await indexer.start_ready()
    async with Publisher(h.settings) as publisher:
        await publisher.publish_now(before)

        async def applied() -> bool:
            return await h.table() == oracle(before)

        await eventually(applied, timeout_s=30, what="the changes applied")
        await idle(indexer)
        await delete_queue(h.settings.amqp_url, h.settings.queue)
        await eventually(lambda: consuming(h.settings), timeout_s=15, what="consuming again")
        await publisher.publish_now(after)
        assert indexer.starts == 1
        await h.drained_and_stopped(indexer, publisher)


# ---- 5. SIGTERM ---------------------------------------------------------------------------------


async def test_sigterm_mid_stream_exits_0_quickly_leaving_nothing_unacknowledged(harness: Harness) -> None:
    h = harness
    stream = history(h.rng, range(1, 301), ORGS)
    indexer = h.indexer()
    await indexer.start_ready()
    async with Publisher(h.settings) as publisher:
        publisher.start(stream, chunk=20, interval_s=0.015)
        await asyncio.sleep(h.rng.uniform(0.5, 1.5))
        code, elapsed = await asyncio.to_thread(indexer.terminate)  # the stream keeps flowing
        print(f"SIGTERM to exit mid-stream: {elapsed:.1f}s")
        assert code == 0, indexer.tail()
        assert elapsed < 10
        assert "Traceback" not in indexer.log_path.read_text(), indexer.tail()
        await publisher.pause()
        acked = await h.check_invariant(publisher)
        assert 0 < acked < len(stream)
        await indexer.start_ready()
        publisher.resume()
        await h.drained_and_stopped(indexer, publisher)


async def test_sigterm_with_a_slow_broker_waits_for_the_close_and_hands_every_delivery_back(harness: Harness) -> None:
    # 0.3 s each way: the broker's close-ok takes longer than the half second a close used to get.
    h = harness
    h.amqp.latency_s = 0.3
    indexer = h.indexer(via=("rabbitmq",), prefetch=1000, batch_messages=50)
    await indexer.start_ready()
    stream = history(h.rng, range(1, 2001), ORGS)
    async with Publisher(h.settings) as publisher:
        publisher.start(stream, chunk=200, interval_s=0.0)
        await publisher.finished()
        await eventually(lambda: _some_rows(h), what="a first batch applied")
        code, elapsed = await asyncio.to_thread(indexer.terminate)
        print(f"SIGTERM to exit with a slow broker: {elapsed:.1f}s")
        assert code == 0 and elapsed < 10, indexer.tail()
        assert "not waiting for them" not in indexer.log_path.read_text(), indexer.tail()
        # Right after the exit every delivery not acknowledged is ready again: none was still held.
        ready, _ = await queue_state(h.settings.amqp_url, h.settings.queue)
        acked = await h.check_invariant(publisher)
        assert ready == len(stream) - acked, (ready, acked)


async def _some_rows(h: Harness) -> bool:
    return bool(await h.table())


async def test_sigterm_with_a_batch_stuck_on_postgres_exits_0_within_10_s(harness: Harness) -> None:
    assert harness.settings.shutdown_timeout_s == 8.0  # the default: the budget for the batch in hand
    await sigterm_with_a_batch_stuck_on_postgres(harness, broker_stalled=False)


async def test_sigterm_with_postgres_down_and_the_broker_stalled_exits_within_10_s(harness: Harness) -> None:
    """The 10 s are for the whole shutdown, not per step: a batch stuck on Postgres and a broker
    that answers nothing (no cancel-ok, no close-ok) must not add up beyond them."""
    await sigterm_with_a_batch_stuck_on_postgres(harness, broker_stalled=True)


async def sigterm_with_a_batch_stuck_on_postgres(h: Harness, *, broker_stalled: bool) -> None:
    stream = history(h.rng, range(1, 301), ORGS)
    indexer = h.indexer(via=("postgres", "rabbitmq") if broker_stalled else ("postgres",))
    await indexer.start_ready()
    async with Publisher(h.settings) as publisher:
        publisher.start(stream, chunk=20, interval_s=0.02)
        await some_progress(h)
        h.postgres.cut()
        await indexer.wait_status(503, timeout_s=10)
        if broker_stalled:
            h.amqp.freeze()
        await asyncio.sleep(0.5)  # the batch in hand stays stuck a while (and the broker stalled)
        code, elapsed = await asyncio.to_thread(indexer.terminate)
        print(f"SIGTERM to exit with a batch stuck{' and the broker stalled' if broker_stalled else ''}: {elapsed:.1f}s")
        assert code == 0, indexer.tail()
        assert elapsed < 10, f"exit took {elapsed:.1f}s"
        if broker_stalled:
            h.amqp.restore()
        await publisher.pause()
        await h.check_invariant(publisher)
        h.postgres.restore()
        await indexer.start_ready()
        publisher.resume()
        await h.drained_and_stopped(indexer, publisher)


# ---- 6. memory ----------------------------------------------------------------------------------


async def test_memory_stays_bounded_whatever_the_queue_depth(harness: Harness) -> None:
    """Not timed: with Postgres away the indexer cannot make progress while 20k messages (40 MB of
    bodies) pile up; it must hold no more than its prefetch of them, so its RSS hardly moves."""
    h = harness
    prefetch = 200
    indexer = h.indexer(via=("postgres",), prefetch=prefetch, batch_messages=prefetch)
    await indexer.start_ready()
    await asyncio.sleep(0.5)  # the allocations of its start-up settle before the baseline is taken
    baseline = indexer.rss_bytes()
    peak = baseline

    async def sample() -> None:
        nonlocal peak
        while indexer.running:
            try:
                peak = max(peak, indexer.rss_bytes())
            except OSError:  # it has just exited
                return
            await asyncio.sleep(0.01)

    sampler = asyncio.create_task(sample())
    stream = history(h.rng, range(1, 2001), ORGS)[:20_000]
    try:
        async with Publisher(h.settings, padding=2048) as publisher:
            h.postgres.cut()
            publisher.start(stream, chunk=1000, interval_s=0)
            await publisher.finished()
            # The broker has handed over all it will: the indexer holds exactly its prefetch.
            held = await steady_ready_count(h.settings)
            assert held == len(stream) - prefetch
            await asyncio.sleep(0.5)  # the sampler watches it hold its prefetch a while
            held_peak = peak
            h.postgres.restore()
            await h.drained_and_stopped(indexer, publisher)
    finally:
        sampler.cancel()
    mb = 2**20
    print(f"RSS idle {baseline / mb:.0f} MB, holding {held_peak / mb:.0f} MB, peak {peak / mb:.0f} MB")
    assert (peak - baseline) / mb < 25, f"RSS grew from {baseline / mb:.0f} to {peak / mb:.0f} MB"


async def steady_ready_count(settings: Settings, steady_s: float = 1.0, timeout_s: float = 30) -> int:
    """The queue's ready count once it has not changed for ``steady_s``."""
    deadline = time.monotonic() + timeout_s
    last, since = -1, time.monotonic()
    while time.monotonic() < deadline:
        ready, _ = await queue_state(settings.amqp_url, settings.queue)
        if ready != last:
            last, since = ready, time.monotonic()
        elif time.monotonic() - since >= steady_s:
            return ready
        await asyncio.sleep(0.1)
    raise AssertionError(f"the queue never settled (last ready count {last})")
