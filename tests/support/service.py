"""Run the real service in-process for a test, feed it changes through RabbitMQ, and observe it
without blocking the event loop it runs on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import aio_pika

from indexer.changes import Change
from indexer.config import Settings
from indexer.ingest import wire
from indexer.service import Service
from tests.support.tables import aread_mentions
from tests.support.waiting import eventually


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[Service]:
    """The service of ``mention-indexer run``, ready (consuming) on entry, stopped on exit."""
    service = Service(settings)
    task = asyncio.create_task(service.run())

    async def ready() -> bool:
        if task.done():
            task.result()
        return service.health.snapshot()[0]

    await eventually(ready)
    try:
        yield service
    finally:
        service.request_stop()
        await asyncio.wait_for(task, 15)


async def acknowledged(service: Service, deliveries: int, timeout_s: float = 20) -> None:
    """Until ``service`` has acknowledged ``deliveries`` deliveries in all since it started (dead
    letters included): each of their batches is committed and its caches invalidated."""
    try:
        await asyncio.wait_for(service.wait_acknowledged(deliveries), timeout_s)
    except TimeoutError:
        raise AssertionError(
            f"{service.acknowledged} of {deliveries} deliveries acknowledged within {timeout_s}s"
        ) from None


async def rows(settings: Settings) -> dict[int, tuple[Any, ...]]:
    """The read model: mention_id → (organization_id, mention_date, transaction_timestamp, deleted)."""
    return await aread_mentions(settings.database_url, settings.schema_name)


def change_body(change: Change, *, padding: int = 0) -> bytes:
    """The event of ``change`` as a producer publishes it (its organization in ``Core`` too).

    ``padding`` bytes more, in an unknown length-delimited field (number 1000): skipped by the
    decoder, as a field of a newer schema would be; it only makes the message bigger."""
    message = wire.mention_message(
        change.kind, change.mention_id, change.organization_id, change.mention_date, change.transaction_timestamp
    )
    body = wire.encode(wire.build_event(message, organization_id=str(change.organization_id or "")))
    if padding:
        body += _varint((1000 << 3) | 2) + _varint(padding) + b"x" * padding
    return body


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


async def publish_changes(settings: Settings, changes: Iterable[Change]) -> None:
    """Publish in order over one connection, each confirmed by the broker."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.exchange)
        for change in changes:
            message = aio_pika.Message(change_body(change), content_type=wire.CONTENT_TYPE)
            await exchange.publish(message, f"events.{change.kind.event_name}")
