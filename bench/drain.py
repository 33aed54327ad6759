"""Drain rate of `run` over a backlog, beside raw aio-pika consume+ack and a naive consumer.

    .venv/bin/python bench/drain.py [--json] [--size small|full] [--events N] [--orgs N]
                                    [--only service,raw,naive] [--naive-events N]
                                    [--profile FILE] [--loop asyncio|uvloop] [--repeat K]

The same N events (default 50,000; the mix of ``_common.mix``: mostly inserts, some updates,
moves and deletes, duplicates and stale updates, over ~1,000 organizations) are published as a
backlog into the service's own queue (its type: quorum by default) three times, and drained by:

* **service**: ``indexer.service.Service`` in-process with the default batching settings (only the
  names are scratch): decode, commit, invalidate, ack;
* **raw**: aio-pika ``queue.consume`` with the same prefetch, acking ``multiple=True`` every
  INDEXER_BATCH_MESSAGES deliveries, doing nothing else (the ceiling of the broker + client);
* **naive**: one decode, one ``Store.apply`` transaction, one invalidation and one ack per message
  (the obvious consumer), over the first 5,000 of the same messages (``--naive-events``: ~20 s at
  ~250/s; its rate does not depend on the backlog's length).

Each is timed from its consumer's registration to the acknowledgement of the last message; the
CPU time of this process per event is printed beside (less sensitive to a busy machine than the
rate).  ``--repeat K`` alternates the raw and service runs K times and takes each one's median.
Figures: service ≥ 0.8 × raw and ≥ 5 × naive.  The service's and the naive consumer's tables are
compared (same content expected).  Not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any

import aio_pika

from _common import (
    Report,
    Scratch,
    declare,
    info,
    metric_sum,
    mix,
    mix_summary,
    parser,
    profiled,
    publish_backlog,
    quiet_logging,
    settings_for,
    sized,
    table_digest,
    tag,
)
from indexer.cache import CacheInvalidator
from indexer.changes import Change
from indexer.config import Settings
from indexer.ingest import wire
from indexer.readmodel.migrate import migrate_async
from indexer.readmodel.store import Store
from indexer.service import Service


async def drain_service(settings: Settings, count: int) -> dict[str, Any]:
    service = Service(settings)
    opened: list[float] = []
    open_session = service._open_session

    async def timed_open() -> Any:  # the clock starts when the consumer is registered
        session = await open_session()
        opened.append(time.perf_counter())
        return session

    service._open_session = timed_open  # type: ignore[method-assign]
    cpu = os.times()
    task = asyncio.create_task(service.run())
    waiting = asyncio.create_task(service.wait_acknowledged(count))
    done, _ = await asyncio.wait({task, waiting}, return_when=asyncio.FIRST_COMPLETED, timeout=900)
    finished = time.perf_counter()
    cpu_after = os.times()
    if waiting not in done:
        waiting.cancel()
        service.request_stop()
        await task
        raise RuntimeError(f"the service acknowledged {service.acknowledged} of {count} in time")
    service.request_stop()
    await asyncio.wait_for(task, 20)
    elapsed = finished - opened[0]
    batches = metric_sum(service, "batches_total")
    return {
        "seconds": elapsed,
        "rate": count / elapsed,
        "batches": batches,
        "mean_batch": count / batches if batches else None,
        "apply_s": metric_sum(service, "apply_duration_seconds_sum"),
        "invalidate_s": metric_sum(service, "invalidation_duration_seconds_sum"),
        "cpu_s": (cpu_after.user - cpu.user) + (cpu_after.system - cpu.system),
        "outcomes": {
            outcome: service.metrics.messages.labels(outcome)._value.get()
            for outcome in ("applied", "duplicate", "stale", "ignored", "dead_lettered", "refresh", "held")
        },
    }


async def drain_raw(settings: Settings, count: int) -> dict[str, Any]:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=settings.prefetch)
        queue = await channel.declare_queue(settings.queue, passive=True)
        done = asyncio.Event()
        state = {"seen": 0, "pending": 0, "bytes": 0}
        batch = settings.batch_messages

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            state["seen"] += 1
            state["pending"] += 1
            state["bytes"] += len(message.body)
            if state["pending"] >= batch or state["seen"] >= count:
                state["pending"] = 0
                await message.ack(multiple=True)
                if state["seen"] >= count:
                    done.set()

        cpu = os.times()
        started = time.perf_counter()
        consumer = await queue.consume(on_message)
        await asyncio.wait_for(done.wait(), 900)
        elapsed = time.perf_counter() - started
        cpu_after = os.times()
        await queue.cancel(consumer)
    return {
        "seconds": elapsed,
        "rate": count / elapsed,
        "cpu_s": (cpu_after.user - cpu.user) + (cpu_after.system - cpu.system),
    }


async def drain_naive(settings: Settings, count: int) -> dict[str, Any]:
    """One transaction, one invalidation, one ack per message, with the product's own codec, store
    and invalidator (so only the batching differs)."""
    await migrate_async(settings.database_url, settings.schema_name)
    store = Store(settings.database_url, settings.schema_name)
    cache = CacheInvalidator.from_settings(settings)
    await cache.start()
    await store.ping()
    connection = await aio_pika.connect(settings.amqp_url)
    try:
        async with connection:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=settings.prefetch)
            queue = await channel.declare_queue(settings.queue, passive=True)
            seen = 0
            cpu = os.times()
            started = time.perf_counter()
            async with queue.iterator() as messages:
                async for message in messages:
                    item = wire.decode(message.body, message.content_type, max_bytes=settings.max_message_bytes)
                    if isinstance(item, Change):
                        result = await store.apply([item])
                        if result.organizations:
                            await cache.invalidate(sorted(result.organizations))
                    await message.ack()
                    seen += 1
                    if seen >= count:
                        break
            elapsed = time.perf_counter() - started
            cpu_after = os.times()
    finally:
        await store.aclose()
        await cache.aclose()
    return {
        "seconds": elapsed,
        "rate": count / elapsed,
        "cpu_s": (cpu_after.user - cpu.user) + (cpu_after.system - cpu.system),
    }


async def main_async(args: Any, report: Report, scratch: Scratch) -> None:
    events_n = sized(args, "events", 50_000, 2_000)
    naive_n = min(events_n, sized(args, "naive_events", 5_000, 500))
    orgs = sized(args, "orgs", 1000, 100)
    only = set(args.only.split(",")) if args.only else {"service", "raw", "naive"}
    name = tag("drain")
    base = settings_for(name)
    scratch.service_names(base)
    scratch.schemas.append(name + "_naive")
    naive_settings = settings_for(name, schema_name=name + "_naive")
    await declare(base)
    info(f"generating {events_n:,} events over {orgs:,} organizations")
    events = mix(events_n, orgs=orgs)
    pairs = [(e.routing_key, e.body) for e in events]
    report.params.update(
        events=events_n,
        naive_events=naive_n,
        queue_type=base.queue_type,
        prefetch=base.prefetch,
        batch_messages=base.batch_messages,
        batch_wait_ms=base.batch_wait_ms,
        mix=mix_summary(events),
        repeat=args.repeat,
    )
    results: dict[str, dict[str, Any]] = {}
    runs: dict[str, list[dict[str, Any]]] = {}
    order = [c for c in ("raw", "naive", "service") if c in only]
    for attempt in range(args.repeat):
        for consumer in order:
            if consumer == "naive" and attempt > 0:
                continue  # slow and steady: once is enough
            n = naive_n if consumer == "naive" else events_n
            publish_s = await publish_backlog(base, pairs[:n], expect_in_queue=n)
            info(f"{consumer}: backlog of {n:,} published in {publish_s:.1f} s; draining")
            if consumer == "raw":
                result = await drain_raw(base, n)
            elif consumer == "naive":
                result = await drain_naive(naive_settings, n)
            else:
                if attempt > 0:  # an empty read model again, as the first time
                    await drop_schema(base)
                with profiled(args.profile if attempt == 0 else None):
                    result = await drain_service(base, n)
            result["cpu_us_per_event"] = result["cpu_s"] / n * 1e6
            runs.setdefault(consumer, []).append(result)
            info(f"{consumer}: {result['rate']:,.0f} events/s ({result['seconds']:.2f} s,"
                 f" {result['cpu_us_per_event']:.0f} µs CPU per event)")
    for consumer, attempts in runs.items():
        # The run of median rate stands for the consumer; every run is in the JSON.
        results[consumer] = sorted(attempts, key=lambda r: r["rate"])[len(attempts) // 2]
        if len(attempts) > 1:
            results[consumer]["all_rates"] = [round(r["rate"]) for r in attempts]
    report.measurements.update(results)

    service = results.get("service")
    raw = results.get("raw")
    naive = results.get("naive")
    if service is not None:
        s = service
        other = s["seconds"] - s["apply_s"] - s["invalidate_s"]
        report.note(
            f"service: {s['batches']:.0f} batches (mean {s['mean_batch']:.0f} messages); of {s['seconds']:.2f} s:"
            f" apply {s['apply_s']:.2f} s, invalidate {s['invalidate_s']:.2f} s, the rest (consume, decode,"
            f" batching waits, ack) {other:.2f} s; process CPU {s['cpu_s']:.2f} s"
        )
        report.measurements["service"]["other_s"] = other
        for consumer, r in results.items():
            extra = f" (runs: {', '.join(f'{x:,}' for x in r['all_rates'])})" if "all_rates" in r else ""
            report.note(f"{consumer}: {r['rate']:,.0f} events/s, {r['cpu_us_per_event']:.0f} µs CPU per event{extra}")
        if raw is not None:
            report.figure(
                "drain_rate_vs_raw", s["rate"], "events/s", 0.8 * raw["rate"], ">=",
                f"0.8 × raw aio-pika consume+multi-ack {raw['rate']:,.0f} events/s",
            )
        if naive is not None:
            report.figure(
                "drain_rate_vs_naive", s["rate"], "events/s", 5 * naive["rate"], ">=",
                f"5 × naive consumer {naive['rate']:,.0f} events/s (one transaction and ack per message)",
            )
        if raw is None and naive is None:
            report.figure("drain_rate", s["rate"], "events/s", None, ">=", "no reference consumer run")
    if service is not None and naive is not None and naive_n == events_n:
        ours = table_digest(base.database_url, base.schema_name)
        theirs = table_digest(naive_settings.database_url, naive_settings.schema_name)
        report.measurements["tables_equal"] = ours == theirs
        report.note(f"service and naive tables equal: {ours == theirs} ({ours[0]:,} rows)")


async def drop_schema(settings: Settings) -> None:
    import psycopg
    from psycopg import sql

    async with await psycopg.AsyncConnection.connect(settings.database_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(settings.schema_name)))


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--events", type=int, help="backlog size (default 50,000; small: 2,000)")
    p.add_argument("--naive-events", type=int, help="messages the naive consumer drains (default 5,000 of the same backlog: its rate is steady; small: 500)")
    p.add_argument("--orgs", type=int, help="organizations (default 1,000; small: 100)")
    p.add_argument("--only", help="comma-separated subset of service,raw,naive")
    p.add_argument("--profile", metavar="FILE", help="py-spy the service's drain into FILE (collapsed stacks)")
    p.add_argument("--repeat", type=int, default=1,
                   help="alternate raw and service runs this many times; the median run of each counts")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                   help="event loop of all three consumers (uvloop: pip install uvloop)")
    args = p.parse_args()
    quiet_logging()
    report = Report("drain", "bench/drain.py " + " ".join(sys.argv[1:]))
    if args.loop == "uvloop":
        import uvloop

        uvloop.install()
    report.params["loop"] = args.loop
    with Scratch(settings_for("cleanup")) as scratch:
        asyncio.run(main_async(args, report, scratch))
    report.emit(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
