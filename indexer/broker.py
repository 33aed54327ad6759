"""RabbitMQ: topology, consuming in batches, acknowledging, dead-lettering, publishing with confirms.

The only module that imports aio-pika.  The service sees ``Session`` (one connection's life) and
``Delivery`` (a message bound to the channel it came from), never aio-pika objects, so the apply
logic is testable without a broker.

No robust connection: a ``Session`` dies with its connection and the service opens a new one.
That is deliberate (aio-pika #231, #312, #563): deliveries of a dead channel can never be acked on a
new one, because they are dropped together with the session that received them, and the consumer is
registered again by construction.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage

from .config import Settings
from .errors import IndexerError, Unavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# Properties a dead letter keeps as they were; the others travel as x-original-* headers because
# the broker would act on them again (expiration) or refuse them from another user (user_id).
_KEPT_PROPERTIES = (
    "content_type",
    "content_encoding",
    "correlation_id",
    "reply_to",
    "message_id",
    "timestamp",
    "type",
    "app_id",
    "priority",
)
ERROR_HEADER = "x-indexer-error"

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,
)


class SessionLost(Unavailable):
    """The connection or a channel of the session closed under us."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received message; ``_message`` ties it to its channel so it is acked only there."""

    body: bytes
    content_type: str | None
    routing_key: str
    exchange: str
    headers: dict[str, Any]
    _message: AbstractIncomingMessage = field(repr=False)


def queue_arguments(settings: Settings) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-queue-type": settings.queue_type}
    if settings.queue_type == "quorum":
        # RabbitMQ 4.x gives quorum queues a delivery limit of 20 and then drops the message (we
        # set no dead-letter exchange on purpose: our DLQ carries a reason).  A message we could
        # not finish (outage, kill -9) or an operator's `dlq list` must never cost it its life.
        arguments["x-delivery-limit"] = 2**31 - 1
    return arguments


async def connect(url: str, *, timeout_s: float = 10.0) -> aio_pika.abc.AbstractConnection:
    try:
        return await aio_pika.connect(url, timeout=timeout_s)
    except (*CONNECTION_ERRORS, asyncio.TimeoutError) as exc:
        raise Unavailable("rabbitmq", url, type(exc).__name__ + (f": {exc}" if str(exc) else "")) from None


async def declare_topology(channel: aio_pika.abc.AbstractChannel, settings: Settings) -> aio_pika.abc.AbstractQueue:
    """Exchange, queue, bindings and dead-letter queue; idempotent, shared by every indexer."""
    exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    await _declare_queue(channel, settings.dlq, settings)
    queue = await _declare_queue(channel, settings.queue, settings)
    for routing_key in settings.routing_keys:
        await queue.bind(exchange, routing_key)
    return queue


async def _declare_queue(
    channel: aio_pika.abc.AbstractChannel, name: str, settings: Settings
) -> aio_pika.abc.AbstractQueue:
    """Declare ``name`` durable with our arguments; a queue that already exists with other
    arguments (declared by an operator, a policy or an older version) is used as it is."""
    try:
        return await channel.declare_queue(name, durable=True, arguments=queue_arguments(settings))
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        log.warning("queue %s exists with other arguments (%s); using it as it is", name, exc)
        await channel.reopen()
        return await channel.declare_queue(name, passive=True)


class Session:
    """One AMQP connection: a consuming channel, a confirming channel for dead letters."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._inbox: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._lost = asyncio.Event()
        self._consumer_tag: str | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._dlq_channel: aio_pika.abc.AbstractChannel | None = None

    async def open(self) -> None:
        settings = self._settings
        self._connection = await connect(settings.amqp_url)
        self._connection.close_callbacks.add(self._on_close)
        try:
            channel = await self._connection.channel(publisher_confirms=False)
            # Declaring may close (and reopen) the channel once, see _declare_queue: only watch
            # the channel for closes once the topology stands.
            self._queue = await declare_topology(channel, settings)
            channel.close_callbacks.add(self._on_close)
            await channel.set_qos(prefetch_count=settings.prefetch)
            # on_return_raises: a dead letter the broker cannot route (DLQ deleted under us) must
            # fail, not count as delivered while the original is acked away.
            self._dlq_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._dlq_channel.close_callbacks.add(self._on_close)
            # The broker can cancel a consumer and leave its channel open (queue deleted, and so
            # on): nothing would arrive again while all looks well.  Treat it as a lost session,
            # so the service opens a new one, declares the topology again and consumes.
            underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
            self._consumer_tag = await self._queue.consume(self._receive)
        except CONNECTION_ERRORS as exc:
            await self.close()
            raise SessionLost("rabbitmq", settings.amqp_url, str(exc) or type(exc).__name__) from None
        log.info("consuming from queue %s (prefetch %d)", settings.queue, settings.prefetch)

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        if not self._lost.is_set():
            log.warning("rabbitmq session closed: %s", exc or "closed")
        self._lost.set()

    def _on_consumer_cancelled(self, _frame: Any) -> None:
        if not self._lost.is_set():
            log.warning("rabbitmq cancelled our consumer (was queue %s deleted?)", self._settings.queue)
        self._lost.set()

    async def _receive(self, message: AbstractIncomingMessage) -> None:
        # The inbox holds at most `prefetch` deliveries: the broker sends no more until we ack.
        self._inbox.append(
            Delivery(
                body=message.body,
                content_type=message.content_type,
                routing_key=message.routing_key or "",
                exchange=message.exchange or "",
                headers=dict(message.headers or {}),
                _message=message,
            )
        )
        self._arrived.set()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def next_batch(self, batch_size: int, batch_wait_ms: int) -> list[Delivery]:
        """Up to ``batch_size`` deliveries, waiting at most ``batch_wait_ms`` after the first."""
        await self._wait_for_delivery(None)
        deadline = time.monotonic() + batch_wait_ms / 1000
        batch: list[Delivery] = []
        while len(batch) < batch_size:
            if self._inbox:
                batch.append(self._inbox.popleft())
                continue
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not await self._wait_for_delivery(remaining_s):
                break
        return batch

    async def _wait_for_delivery(self, timeout_s: float | None) -> bool:
        # Waits on events, never on a get: cancelling an event wait cannot swallow a delivery,
        # and a swallowed delivery would later be acked unprocessed by a multiple=True ack.
        while not self._inbox:
            if self._lost.is_set():
                raise SessionLost("rabbitmq", self._settings.amqp_url, "connection lost")
            self._arrived.clear()
            waiters = {asyncio.ensure_future(self._arrived.wait()), asyncio.ensure_future(self._lost.wait())}
            try:
                done, _ = await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiter in waiters:
                    waiter.cancel()
            if not done:
                return False
        return True

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` unless the session is lost first; then cancel it and raise SessionLost."""
        task = asyncio.ensure_future(awaitable)
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            await asyncio.wait({task, lost}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            task.cancel()
            raise
        finally:
            lost.cancel()
        if task.done():
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:
            pass
        raise SessionLost("rabbitmq", self._settings.amqp_url, "connection lost")

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish to the DLQ with the original body and properties; returns once confirmed."""
        assert self._dlq_channel is not None
        original = delivery._message
        headers = dict(delivery.headers)
        headers[ERROR_HEADER] = reason
        headers["x-original-exchange"] = delivery.exchange
        headers["x-original-routing-key"] = delivery.routing_key
        headers["x-dead-lettered-at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        if original.expiration is not None:
            headers["x-original-expiration"] = str(round(original.expiration * 1000))  # ms, as on the wire
        if original.user_id:
            headers["x-original-user-id"] = original.user_id
        kept = {name: getattr(original, name) for name in _KEPT_PROPERTIES}
        message = aio_pika.Message(
            delivery.body, headers=headers, delivery_mode=aio_pika.DeliveryMode.PERSISTENT, **kept
        )
        try:
            await self.guard(self._dlq_channel.default_exchange.publish(message, self._settings.dlq, mandatory=True))
        except aio_pika.exceptions.PublishError:
            # Routed nowhere: end the session; the next one declares the DLQ again and the batch,
            # unacknowledged, is redelivered and dead-lettered there.
            self._lost.set()
            raise SessionLost("rabbitmq", self._settings.amqp_url, f"dead-letter queue {self._settings.dlq} is missing") from None
        except aiormq.exceptions.DeliveryError as exc:
            # Refused (e.g. a full DLQ with reject-publish): wait and try again, never ack the original.
            raise Unavailable("rabbitmq", self._settings.amqp_url, f"the dead-letter queue refused a message: {exc}") from None
        except CONNECTION_ERRORS as exc:
            raise SessionLost("rabbitmq", self._settings.amqp_url, str(exc) or type(exc).__name__) from None

    async def ack(self, batch: Sequence[Delivery]) -> None:
        """Acknowledge the whole batch with one frame (multiple=True on its last delivery)."""
        if not batch:
            return
        if self._lost.is_set():
            raise SessionLost("rabbitmq", self._settings.amqp_url, "cannot ack on a lost channel")
        try:
            await batch[-1]._message.ack(multiple=True)
        except CONNECTION_ERRORS as exc:
            raise SessionLost("rabbitmq", self._settings.amqp_url, str(exc) or type(exc).__name__) from None

    async def stop_consuming(self) -> None:
        """Cancel the consumer: the broker sends no more; unacked deliveries return on close."""
        if self._queue is not None and self._consumer_tag is not None and not self._lost.is_set():
            try:
                await asyncio.wait_for(self._queue.cancel(self._consumer_tag), 2)
            except (*CONNECTION_ERRORS, asyncio.TimeoutError):
                pass
            self._consumer_tag = None

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._lost.set()
        if connection is not None and not connection.is_closed:
            try:
                await asyncio.wait_for(connection.close(), 3)
            except (*CONNECTION_ERRORS, asyncio.TimeoutError):
                pass


async def publish(
    url: str,
    exchange_name: str,
    routing_key: str,
    body: bytes,
    *,
    content_type: str,
    headers: dict[str, Any] | None = None,
    timeout_s: float = 10.0,
) -> None:
    """Publish one message with publisher confirms and ``mandatory``; raise unless confirmed and routed.

    Used by the producer commands; the exchange must exist (we never declare it from a producer so a
    typo cannot create a stray exchange that routes nowhere).
    """
    connection = await connect(url, timeout_s=timeout_s)
    async with connection:
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            exchange = await channel.get_exchange(exchange_name, ensure=True)
            message = aio_pika.Message(
                body, content_type=content_type, headers=headers or {}, delivery_mode=aio_pika.DeliveryMode.PERSISTENT
            )
            await exchange.publish(message, routing_key, mandatory=True, timeout=timeout_s)
        except aio_pika.exceptions.PublishError:
            raise Unrouted(exchange_name, routing_key) from None
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise Unrouted(exchange_name, routing_key, "exchange does not exist") from None
        except aiormq.exceptions.DeliveryError as exc:
            raise Unavailable("rabbitmq", url, f"broker refused the message: {exc}") from None
        except (*CONNECTION_ERRORS, asyncio.TimeoutError) as exc:
            raise Unavailable("rabbitmq", url, str(exc) or type(exc).__name__) from None


class Unrouted(IndexerError):
    """The broker could route the message to no queue (or the exchange is missing)."""

    def __init__(self, exchange: str, routing_key: str, detail: str = "no queue is bound for it") -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(f"message to exchange {exchange!r} with routing key {routing_key!r} was not routed: {detail}")


__all__ = [
    "DeadLetter",
    "DeadLetterQueue",
    "Delivery",
    "ERROR_HEADER",
    "Session",
    "SessionLost",
    "Unrouted",
    "connect",
    "declare_topology",
    "publish",
]


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
        self._connection = await connect(self._settings.amqp_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _queue(self, channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
        try:
            return await channel.declare_queue(self._settings.dlq, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            raise IndexerError(f"dead-letter queue {self._settings.dlq!r} does not exist (has the indexer run?)") from None

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
                headers = {k: v for k, v in letter.headers.items() if k not in _DLQ_HEADERS}
                expiration = headers.pop("x-original-expiration", None)
                republished = aio_pika.Message(
                    letter.body,
                    headers=headers,
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    expiration=int(expiration) / 1000 if expiration else None,  # aio-pika takes seconds
                    **{name: getattr(message, name) for name in _KEPT_PROPERTIES},
                )
                try:
                    await exchange.publish(republished, letter.routing_key, mandatory=True)
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
        timestamp = timestamp.replace(tzinfo=timezone.utc)
    return DeadLetter(message.body, message.content_type, dict(message.headers or {}), timestamp)
