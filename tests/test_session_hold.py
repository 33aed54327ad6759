"""A delivery the session holds is never acknowledged, not even by a later multiple=True ack."""

from __future__ import annotations

import asyncio

import aio_pika

from indexer.config import Settings
from indexer.ingest.session import Session
from tests.support.amqp import publish_raw


async def _ready(settings: Settings) -> list[bytes]:
    """The bodies waiting in the queue (read and put back)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(settings.queue, passive=True)
        bodies = []
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            bodies.append(message.body)
        return bodies  # unacknowledged: back in the queue when the channel closes


async def test_held_deliveries_survive_later_acks_and_come_back(settings: Settings) -> None:
    session = Session(settings)
    await session.open()
    try:
        await publish_raw(settings.amqp_url, settings.exchange, "events.MentionInserted", [b"a", b"held", b"c"])
        first = await asyncio.wait_for(session.next_batch(3, 1000), 10)
        assert [d.body for d in first] == [b"a", b"held", b"c"]
        session.hold([first[1]])
        await session.ack(first)
        await publish_raw(settings.amqp_url, settings.exchange, "events.MentionInserted", [b"d"])
        second = await asyncio.wait_for(session.next_batch(1, 1000), 10)
        await session.ack(second)  # its multiple=True would have taken "held" with it
    finally:
        await session.close()
    assert await _ready(settings) == [b"held"]
