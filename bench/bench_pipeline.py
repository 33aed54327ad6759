"""End-to-end throughput of `run`: a backlog of mention events through RabbitMQ → Postgres → Redis → ack.

Superseded by ``bench/drain.py`` (the same drain with the raw and naive consumers beside it, and
JSON); kept for ``make bench``.

    .venv/bin/python bench/bench_pipeline.py [--events 50000] [--mentions 20000] [--orgs 200] [--batch-size 500]

Publishes a backlog first (not timed), then starts the service in-process and times the drain.
Uses scratch names (schema, exchange, queues, key prefix) and removes them afterwards; the services
are taken from DATABASE_URL / REDIS_URL / AMQP_URL or the local defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import aio_pika
import psycopg
import redis
from psycopg import sql

from indexer.changes import Kind
from indexer.config import load_settings
from indexer.ingest import wire
from indexer.service import Service


async def publish_backlog(settings, events: list[tuple[str, bytes]]) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.exchange)
        for start in range(0, len(events), 1000):
            await asyncio.gather(*(
                exchange.publish(aio_pika.Message(body, content_type=wire.CONTENT_TYPE), key)
                for key, body in events[start:start + 1000]
            ))


async def ready_count(settings) -> int:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.queue, passive=True)
        return queue.declaration_result.message_count or 0


def make_events(count: int, mentions: int, orgs: int) -> list[tuple[str, bytes]]:
    rng = random.Random(7)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    kinds = [Kind.INSERTED] * 5 + [Kind.UPDATED] * 4 + [Kind.DELETED]
    events = []
    for i in range(count):
        kind = rng.choice(kinds)
        message = wire.mention_message(
            kind, rng.randrange(1, mentions + 1), rng.randrange(1, orgs + 1), t0, t0 + timedelta(microseconds=i)
        )
        events.append((wire.routing_key_for(message), wire.encode(wire.build_event(message))))
    return events


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--mentions", type=int, default=20_000)
    parser.add_argument("--orgs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()

    tag = "bench" + uuid.uuid4().hex[:8]
    settings = load_settings(
        database_url=os.environ.get("DATABASE_URL"), redis_url=os.environ.get("REDIS_URL"),
        amqp_url=os.environ.get("AMQP_URL"), schema_name=tag, exchange=f"{tag}.events", queue=f"{tag}.q",
        cache_prefix=tag, http_port=0, batch_messages=args.batch_size, prefetch=max(1000, 2 * args.batch_size),
    )
    service = Service(settings)
    try:
        # Start once to declare the topology, stop, then build the backlog.
        task = asyncio.create_task(service.run())
        while not service.health.snapshot()[0]:
            await asyncio.sleep(0.05)
        service.request_stop()
        await task

        events = make_events(args.events, args.mentions, args.orgs)
        await publish_backlog(settings, events)
        service = Service(settings)
        started = time.perf_counter()
        task = asyncio.create_task(service.run())
        # Every delivery acknowledged: committed and invalidated (bench/drain.py measures this
        # with its limits beside it).
        await service.wait_acknowledged(args.events)
        elapsed_s = time.perf_counter() - started
        service.request_stop()
        await task
        batches = service.metrics.batches._value.get()
        print(f"events={args.events} batch_size={args.batch_size} mentions={args.mentions} orgs={args.orgs}")
        print(f"drained in {elapsed_s:.2f} s: {args.events / elapsed_s:,.0f} events/s, {batches:.0f} batches, "
              f"{elapsed_s / batches * 1000:.1f} ms/batch")
    finally:
        with psycopg.connect(settings.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(tag)))
        client = redis.Redis.from_url(settings.redis_url)
        for key in client.scan_iter(match=f"{tag}*"):
            client.delete(key)
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            for queue in (settings.queue, settings.dlq):
                await channel.queue_delete(queue)
            await channel.exchange_delete(settings.exchange)


if __name__ == "__main__":
    asyncio.run(main())
