"""Run the real service in-process for a test, and feed it changes through RabbitMQ."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager

import aio_pika

from indexer import wire
from indexer.changes import Change
from indexer.config import Settings
from indexer.service import Service
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


def change_body(change: Change) -> bytes:
    message = wire.mention_message(
        change.kind, change.mention_id, change.organization_id, change.mention_date, change.transaction_timestamp
    )
    return wire.encode(wire.build_event(message))


async def publish_changes(settings: Settings, changes: Iterable[Change]) -> None:
    """Publish in order over one connection, each confirmed by the broker."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        exchange = await channel.get_exchange(settings.exchange)
        for change in changes:
            message = aio_pika.Message(change_body(change), content_type=wire.CONTENT_TYPE)
            await exchange.publish(message, f"events.{change.kind.event_name}")
