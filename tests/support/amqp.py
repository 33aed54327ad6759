"""Test-side RabbitMQ helpers: publish raw bodies, read a queue, count what is left."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import aio_pika
import aiormq

from tests.support.waiting import eventually

if TYPE_CHECKING:
    from indexer.config import Settings


async def publish_raw(
    url: str,
    exchange: str,
    routing_key: str,
    bodies: list[bytes],
    *,
    content_type: str | None = "application/x-protobuf",
    headers: dict[str, Any] | None = None,
) -> None:
    """Publish with confirms; the exchange must exist (the indexer declares it)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        for body in bodies:
            await target.publish(
                aio_pika.Message(body, content_type=content_type, headers=headers or {}), routing_key
            )


async def declare_exchange(url: str, exchange: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_exchange(exchange, aio_pika.ExchangeType.TOPIC, durable=True)


async def queue_state(url: str, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of ``queue``, (0, 0) if it does not exist; unacknowledged
    messages are not counted."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0, 0
        result = declared.declaration_result
        return result.message_count or 0, result.consumer_count or 0


async def ready_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (unacknowledged ones are not counted)."""
    return (await queue_state(url, queue))[0]


async def drain(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Take every ready message out of ``queue`` (acknowledged: they are gone afterwards)."""
    connection = await aio_pika.connect(url)
    taken = []
    async with connection:
        channel = await connection.channel()
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
    return taken


async def delete_queue(url: str, queue: str) -> None:
    """Delete ``queue`` behind the indexer's back, as an operator might."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.queue_delete(queue)


@asynccontextmanager
async def tap(settings: Settings, binding: str = "#") -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """An exclusive queue bound to the test's exchange (declared if needed); gone on exit."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, binding)
        yield queue


async def take_all(
    queue: aio_pika.abc.AbstractQueue, expected: int, timeout_s: float = 5
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Exactly ``expected`` messages from ``queue`` (waits for them), then checks nothing else came."""
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def got_them() -> bool:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return len(taken) >= expected

    await eventually(got_them, timeout_s=timeout_s)
    await asyncio.sleep(0.1)  # a window for one too many to show up
    await got_them()
    assert len(taken) == expected, f"expected {expected} message(s), got {len(taken)}"
    return taken
