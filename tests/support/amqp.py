"""Test-side RabbitMQ helpers: publish raw bodies, read a queue, count what is left."""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq


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


async def ready_count(url: str, queue: str) -> int:
    """Messages ready in ``queue`` (unacknowledged ones are not counted)."""
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return 0
        return declared.declaration_result.message_count or 0


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
