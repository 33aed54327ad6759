"""Latency of `run` at a steady publish rate: publish → committed, and publish → the organization's
cache key gone.

    .venv/bin/python bench/latency.py [--json] [--size small|full] [--rate 1000] [--seconds 30]
                                      [--warmup 3] [--orgs 1000] [--profile FILE] [--no-floor]

`mention-indexer run` runs as a subprocess with the default settings (only the names are scratch:
the drain benchmark measures the same settings under a backlog).  This process publishes events
at ``--rate`` per second (persistent, confirms awaited in the background), 90 % inserts of new
mentions and 10 % updates, the organization going round-robin over ``--orgs``.  Shortly before
each event (at most 0.2 s) a cache key of its own is filled for its organization through the
reader helper (``AsyncCacheReader.get_or_fill``).

Observed from outside, on this process's clock:

* committed: a statement-level trigger on the scratch read model (added after the indexer
  migrated it) sends ``pg_notify`` with the ids it wrote; the notification is delivered when the
  transaction commits, to a LISTENing connection here;
* invalidated: Redis client-side-caching invalidation messages (``CLIENT TRACKING … BCAST PREFIX
  <prefix>:{`` on an idle connection, redirected to a subscribed one) report every write of the
  key: its fill, then its deletion by the indexer's script, in that order.  Nothing in the
  server's configuration is changed.

Figures: p50 ≤ 5 ms and p99 ≤ 20 ms, for each; the max is printed too.  Beside them, the broker's
share: the same rate published to a bare consumer of the same queue, for 8 s before the indexer
starts (``--no-floor`` skips it).  The first ``--warmup``
seconds are left out.  Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from bisect import bisect_left
from datetime import timedelta
from typing import Any

import aio_pika
import psycopg
import redis.asyncio
from psycopg import sql
from redis.asyncio.connection import Connection

from _common import (
    T0,
    RawPublisher,
    Report,
    Scratch,
    Indexer,
    declare,
    event_body,
    info,
    parser,
    profiled,
    quantiles_ms,
    quiet_logging,
    settings_for,
    sized,
    tag,
)
from indexer.cache import AsyncCacheReader
from indexer.changes import Kind
from indexer.config import Settings

_TRIGGER = """
CREATE FUNCTION {schema}.bench_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE ids text;
BEGIN
    FOR ids IN
        SELECT string_agg(mention_id::text, ',')
        FROM (SELECT mention_id, (row_number() OVER ()) / 500 AS part FROM written) AS numbered
        GROUP BY part
    LOOP
        PERFORM pg_notify({channel}, ids);
    END LOOP;
    RETURN NULL;
END $$;
CREATE TRIGGER bench_inserted AFTER INSERT ON {schema}.mentions
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION {schema}.bench_notify();
CREATE TRIGGER bench_updated AFTER UPDATE ON {schema}.mentions
    REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION {schema}.bench_notify();
"""


class Observer:
    """Commit notifications from Postgres, key deletions from Redis, stamped on arrival."""

    def __init__(self, settings: Settings, channel: str) -> None:
        self.settings = settings
        self.channel = channel
        self.committed: dict[int, list[float]] = {}  # mention -> the commits seen writing it
        self.touched: dict[bytes, list[float]] = {}  # key -> its invalidation messages: fill, then deletion
        self._tasks: list[asyncio.Task[None]] = []
        self.redirect_id: int | None = None
        self._pg: psycopg.AsyncConnection | None = None
        self._sub: Connection | None = None

    def gone(self, key: bytes) -> float | None:
        """When ``key`` was deleted: its second message (the first is its fill's; the messages of
        one connection arrive in order)."""
        times = self.touched.get(key)
        return times[1] if times is not None and len(times) > 1 else None

    async def start(self) -> None:
        self._pg = await psycopg.AsyncConnection.connect(self.settings.database_url, autocommit=True)
        await self._pg.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
        pool = redis.asyncio.ConnectionPool.from_url(self.settings.redis_url, protocol=2)
        self._sub = pool.make_connection()
        await self._sub.connect()
        await self._sub.send_command("CLIENT", "ID")
        self.redirect_id = int(await self._sub.read_response())
        await self._sub.send_command("SUBSCRIBE", "__redis__:invalidate")
        await self._sub.read_response()
        self._tasks = [asyncio.create_task(self._commits()), asyncio.create_task(self._deletions())]

    async def _commits(self) -> None:
        assert self._pg is not None
        async for notify in self._pg.notifies():
            now = time.perf_counter()
            for text in notify.payload.split(","):
                self.committed.setdefault(int(text), []).append(now)

    async def _deletions(self) -> None:
        assert self._sub is not None
        while True:
            reply = await self._sub.read_response(timeout=None)
            now = time.perf_counter()
            if isinstance(reply, list) and len(reply) == 3 and reply[0] == b"message" and isinstance(reply[2], list):
                for key in reply[2]:
                    self.touched.setdefault(key, []).append(now)

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pg is not None:
            await self._pg.close()
        if self._sub is not None:
            await self._sub.disconnect()


def plan(rate: int, seconds: float, orgs: int, prefix: str) -> list[tuple[int, int, str, bytes, bytes]]:
    """(mention, org, routing key, body, cache key) per event.  Organizations go round-robin;
    every tenth round updates the mentions the round before inserted (same organization), the
    other rounds insert new mentions: 90 % inserts, 10 % updates, and an event's invalidation
    never touches another organization than its own."""
    events = []
    for i in range(int(rate * seconds)):
        at = T0 + timedelta(milliseconds=i, microseconds=1)
        org, round_ = i % orgs + 1, i // orgs
        if round_ % 10 == 9:
            mention, kind = i - orgs + 1, Kind.UPDATED
        else:
            mention, kind = i + 1, Kind.INSERTED
        key = f"{prefix}:{{{org}}}:e{i}".encode()
        events.append((mention, org, f"events.{kind.event_name}", event_body(kind, mention, org, T0, at), key))
    return events


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU time of a process (this one when None)."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    settings: Settings, rate: int, seconds: float, warmup_s: float, orgs: int, indexer_pid: int
) -> dict[str, Any]:
    channel = f"{settings.schema_name}_commits"
    with psycopg.connect(settings.database_url, autocommit=True) as conn:
        conn.execute(sql.SQL(_TRIGGER).format(schema=sql.Identifier(settings.schema_name), channel=sql.Literal(channel)))
    events = plan(rate, seconds, orgs, settings.cache_prefix)
    observer = Observer(settings, channel)
    await observer.start()
    tracking = redis.asyncio.Redis.from_url(settings.redis_url, single_connection_client=True)
    await tracking.execute_command(
        "CLIENT", "TRACKING", "ON", "REDIRECT", observer.redirect_id, "BCAST", "PREFIX", f"{settings.cache_prefix}:{{"
    )
    pool = redis.asyncio.Redis.from_url(settings.redis_url, max_connections=64)
    reader = AsyncCacheReader(pool, settings.cache_prefix)
    ready = bytearray(len(events))  # 1 once the event's key is filled
    interval = 1.0 / rate
    started = time.perf_counter() + 0.5
    cursor = 0

    async def prefill() -> None:
        """One of 16 workers filling each event's key shortly (at most 0.2 s) before it is due."""
        nonlocal cursor
        while cursor < len(events):
            i, cursor = cursor, cursor + 1
            wait = started + i * interval - 0.2 - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            await reader.get_or_fill(events[i][1], f"e{i}", lambda: b"cached")
            ready[i] = 1

    published: list[float] = []
    confirms: list[asyncio.Future[Any]] = []
    late = unfilled = 0
    try:
        async with RawPublisher(settings) as publisher:
            filling = [asyncio.create_task(prefill()) for _ in range(16)]
            cpu_bench, cpu_indexer = cpu_seconds(), cpu_seconds(indexer_pid)
            for i, (_, _, routing_key, body, _) in enumerate(events):
                due = started + i * interval
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                elif now - due > 0.01:
                    late += 1
                while not ready[i]:  # the key must exist before its event goes out
                    unfilled += 1
                    await asyncio.sleep(0.0005)
                published.append(time.perf_counter())
                confirms.append(await publisher.publish(routing_key, body))
            publish_s = time.perf_counter() - started
            cpu_bench, cpu_indexer = cpu_seconds() - cpu_bench, cpu_seconds(indexer_pid) - cpu_indexer
            await asyncio.gather(*filling)
            await asyncio.gather(*confirms)
            deadline = time.perf_counter() + 10  # the stragglers
            while time.perf_counter() < deadline:
                if all(
                    _after(observer.committed.get(e[0]), t) is not None and observer.gone(e[4]) is not None
                    for e, t in zip(events, published, strict=True)
                ):
                    break
                await asyncio.sleep(0.05)
    finally:
        await observer.aclose()
        await reader.aclose()
        await pool.aclose()
        await tracking.aclose()
    skip = int(rate * warmup_s)
    commit_s: list[float] = []
    gone_s: list[float] = []
    missing_commit = missing_gone = early = 0
    for (mention, _, _, _, key), t_publish in list(zip(events, published, strict=True))[skip:]:
        seen = _after(observer.committed.get(mention), t_publish)
        if seen is None:
            missing_commit += 1
        else:
            commit_s.append(seen - t_publish)
        seen_gone = observer.gone(key)
        if seen_gone is None:
            missing_gone += 1
        elif seen_gone < t_publish:
            early += 1  # deleted by an earlier event's invalidation of the same organization
        else:
            gone_s.append(seen_gone - t_publish)
    return {
        "published": len(published),
        "measured": len(published) - skip,
        "publish_seconds": publish_s,
        "achieved_rate": len(published) / publish_s,
        "late_publishes": late,
        "waits_for_fill": unfilled,  # times the publisher found its event's key not filled yet
        "committed_ms": quantiles_ms(commit_s),
        "invalidated_ms": quantiles_ms(gone_s),
        "missing_commit": missing_commit,
        "missing_invalidation": missing_gone,
        "deleted_before_publish": early,
        "indexer_cpu_share": cpu_indexer / publish_s,
        "bench_cpu_share": cpu_bench / publish_s,
    }


async def broker_floor(settings: Settings, rate: int, seconds: float, warmup_s: float) -> dict[str, Any]:
    """Publish → delivered to a bare aiormq consumer (acking every message) on the same queue, at
    the same rate, before the indexer starts: the part of the latency that is the broker's."""
    events = plan(rate, seconds, 100, settings.cache_prefix)
    received: list[float] = []
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        raw = await channel.get_underlay_channel()

        async def on_message(message: Any) -> None:
            received.append(time.perf_counter())
            await raw.basic_ack(message.delivery.delivery_tag)

        await raw.basic_consume(settings.queue, on_message)
        published: list[float] = []
        async with RawPublisher(settings) as publisher:
            started = time.perf_counter() + 0.1
            confirms = []
            for i, (_, _, routing_key, body, _) in enumerate(events):
                due = started + i / rate
                now = time.perf_counter()
                if due > now:
                    await asyncio.sleep(due - now)
                published.append(time.perf_counter())
                confirms.append(await publisher.publish(routing_key, body))
            await asyncio.gather(*confirms)
        deadline = time.perf_counter() + 5
        while len(received) < len(published) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)
    skip = int(rate * warmup_s)
    # One consumer, one publisher, FIFO: the i-th delivery is the i-th message.
    return quantiles_ms([r - p for p, r in list(zip(published, received))[skip:]])


def _after(times: list[float] | None, moment: float) -> float | None:
    """The first of the (sorted) ``times`` at or after ``moment``: an update's own commit, not its insert's."""
    if not times:
        return None
    index = bisect_left(times, moment)
    return times[index] if index < len(times) else None


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--rate", type=int, help="events per second (default 1,000; small: 200)")
    p.add_argument("--seconds", type=float, help="publishing time (default 30; small: 3)")
    p.add_argument("--warmup", type=float, help="seconds left out at the start (default 3; small: 0.5)")
    p.add_argument("--orgs", type=int, help="organizations, round-robin (default 1,000; small: 100)")
    p.add_argument("--profile", metavar="FILE", help="py-spy the indexer subprocess into FILE (collapsed stacks)")
    p.add_argument("--no-floor", action="store_true", help="skip the broker-only reference phase")
    args = p.parse_args()
    quiet_logging()
    rate = sized(args, "rate", 1000, 200)
    seconds = sized(args, "seconds", 30.0, 3.0)
    warmup = sized(args, "warmup", 3.0, 0.5)
    orgs = sized(args, "orgs", 1000, 100)
    settings = settings_for(tag("latency"))
    report = Report("latency", "bench/latency.py " + " ".join(sys.argv[1:]))
    report.params.update(
        rate=rate, seconds=seconds, warmup=warmup, orgs=orgs,
        batch_messages=settings.batch_messages, batch_wait_ms=settings.batch_wait_ms, prefetch=settings.prefetch,
        queue_type=settings.queue_type,
    )
    with Scratch(settings) as scratch:
        scratch.service_names(settings)
        floor = None
        if not args.no_floor:
            asyncio.run(declare(settings))
            floor = asyncio.run(broker_floor(settings, rate, min(seconds, 8.0), min(warmup, 1.0)))
            info(f"broker only: p50 {floor['p50']:.1f} ms, p99 {floor['p99']:.1f} ms")
        indexer = Indexer(settings)
        try:
            indexer.wait_ready()
            info(f"indexer pid {indexer.pid} ready; publishing {rate}/s for {seconds:g} s")
            with profiled(args.profile, pid=indexer.pid):
                result = asyncio.run(measure(settings, rate, seconds, warmup, orgs, indexer.pid))
            batches = indexer.batch_stats()
        finally:
            indexer.stop()
    report.measurements.update(result)
    if floor is not None:
        report.measurements["broker_only_ms"] = floor
        report.note(
            f"broker only (publish → a bare consumer, same queue and rate, before the indexer ran): p50"
            f" {floor['p50']:.1f} ms, p99 {floor['p99']:.1f} ms, max {floor['max']:.1f} ms"
        )
    report.note(
        f"published {result['published']:,} at {result['achieved_rate']:,.0f}/s ({result['late_publishes']} more than"
        f" 10 ms late); measured {result['measured']:,} after the warm-up; not seen: {result['missing_commit']} commits,"
        f" {result['missing_invalidation']} invalidations; {result['deleted_before_publish']} keys deleted before"
        f" their event (left out); CPU: indexer {result['indexer_cpu_share']:.0%} of a core, this process"
        f" {result['bench_cpu_share']:.0%}"
    )
    report.measurements["indexer_batches"] = batches
    report.note(
        "indexer's batches (its /metrics): "
        + ", ".join(f"{name} {value:,.1f}" for name, value in batches.items())
    )
    for what, label in (("committed_ms", "publish_to_committed"), ("invalidated_ms", "publish_to_invalidated")):
        q = result[what]
        report.note(f"{label}: p50 {q['p50']:.1f} ms, p90 {q['p90']:.1f} ms, p99 {q['p99']:.1f} ms, max {q['max']:.1f} ms")
        report.figure(f"{label}_p50", q["p50"], "ms", 5, "<=", f"issue target at {rate}/s")
        report.figure(f"{label}_p99", q["p99"], "ms", 20, "<=", f"issue target at {rate}/s")
        report.figure(f"{label}_max", q["max"], "ms", None, "<=", "printed for reference")
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
