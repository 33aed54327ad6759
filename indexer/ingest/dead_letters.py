"""The operator's side of ``<queue>.dlq``: list, replay, purge."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from indexer.config import Settings
from indexer.errors import IndexerError
from indexer.ingest import republish
from indexer.ingest.publish import Unrouted
from indexer.ingest.topology import ERROR_HEADER, connect


@dataclass(frozen=True, slots=True)
class DeadLetter:
    body: bytes
    content_type: str | None
    headers: dict[str, Any]
    timestamp: datetime | None

    @property
    def reason(self) -> str:
        return str(self.headers.get(ERROR_HEADER, "?"))

    @property
    def routing_key(self) -> str:
        return str(self.headers.get("x-original-routing-key", ""))


_DLQ_HEADERS = (ERROR_HEADER, "x-original-exchange", "x-original-routing-key", "x-dead-lettered-at")


class DeadLetterQueue:
    """The operator's view of ``<queue>.dlq``: list, replay, purge.  Use as ``async with``."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> DeadLetterQueue:
        self._connection, _ = await connect(self._settings.amqp_url, name=f"dlq {self._settings.dlq}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _queue(self, channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        try:
            return await channel.declare_queue(self._settings.dlq, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise IndexerError(
                f"dead-letter queue {self._settings.dlq!r} does not exist (has the indexer run?)"
            ) from None

    async def count(self) -> int:
        assert self._connection is not None
        async with self._connection.channel() as channel:
            queue = await self._queue(channel)
            return queue.declaration_result.message_count or 0

    async def peek(self, limit: int) -> list[DeadLetter]:
        """Up to ``limit`` dead letters, left in the queue (fetched unacked, returned on close)."""
        assert self._connection is not None
        letters: list[DeadLetter] = []
        async with self._connection.channel() as channel:
            queue = await self._queue(channel)
            for _ in range(limit):
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                letters.append(_letter(message))
            # Closing the channel returns every fetched message to the queue.
        return letters

    async def replay(self, limit: int | None) -> int:
        """Republish to the exchange with the original routing key; remove each once confirmed.

        Interrupted at any point, a letter is either still in the DLQ or already republished (or,
        between the confirm and the ack, both: a duplicate the ordering rule makes harmless).
        """
        assert self._connection is not None
        replayed = 0
        async with self._connection.channel(publisher_confirms=True, on_return_raises=True) as channel:
            queue = await self._queue(channel)
            # Letters that fail again during the replay land at the back: stop at the count we saw.
            budget = queue.declaration_result.message_count or 0
            if limit is not None:
                budget = min(budget, limit)
            try:
                exchange = await channel.get_exchange(self._settings.exchange, ensure=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                raise IndexerError(
                    f"exchange {self._settings.exchange!r} does not exist: nothing to replay to (has the indexer run?)"
                ) from None
            while replayed < budget:
                message = await queue.get(no_ack=False, fail=False)
                if message is None:
                    break
                letter = _letter(message)
                properties = republish.replay_properties(message, set(_DLQ_HEADERS))
                try:
                    await republish.publish(channel, letter.body, properties, letter.routing_key, exchange.name)
                except aio_pika.exceptions.PublishError:
                    await message.nack(requeue=True)
                    raise Unrouted(self._settings.exchange, letter.routing_key) from None
                await message.ack()
                replayed += 1
        return replayed

    async def purge(self) -> int:
        assert self._connection is not None
        async with self._connection.channel() as channel:
            queue = await self._queue(channel)
            result = await queue.purge()
            return int(result.message_count or 0)


def _letter(message: AbstractIncomingMessage) -> DeadLetter:
    timestamp = message.timestamp
    if timestamp is not None and timestamp.tzinfo is None:
        timestamp = timestamp.replace(tzinfo=UTC)
    return DeadLetter(message.body, message.content_type, dict(message.headers or {}), timestamp)
