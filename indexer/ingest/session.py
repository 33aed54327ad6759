"""One AMQP connection's life: consume in batches, dead-letter, acknowledge.

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
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import aio_pika
import aiormq
from aiormq.abc import DeliveredMessage
from pamqp.commands import Basic

from indexer.config import Settings
from indexer.errors import Unavailable
from indexer.ingest import republish
from indexer.ingest.topology import (
    CONNECTION_ERRORS,
    ERROR_HEADER,
    connect,
    declare_topology,
    node_failed,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
_TURNS_FOR_MORE = 4  # measured: 1 turn gave batches of ~110 under a backlog, 3-4 fill them (bench/drain.py)


class SessionLost(Unavailable):
    """The connection or a channel of the session closed under us."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received message, as the broker sent it; acknowledged by its session only."""

    body: bytes
    content_type: str | None
    routing_key: str
    exchange: str
    headers: dict[str, Any]
    received_s: float  # time.monotonic() when it arrived
    delivery_tag: int
    properties: Basic.Properties = field(repr=False)
    """Every property as decoded from the wire (dead letters copy them exactly)."""


class Session:
    """One AMQP connection: a consuming channel, a confirming channel for dead letters."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._connection: aio_pika.abc.AbstractConnection | None = None
        self._node: str | None = None  # the URL of the node this session is connected to
        self._inbox: deque[Delivery] = deque()
        self._arrived = asyncio.Event()
        self._lost = asyncio.Event()
        self._consumer_tag: str | None = None
        self._channel: aiormq.abc.AbstractChannel | None = None  # the consuming one, under aio-pika
        self._dlq_channel: aio_pika.abc.AbstractChannel | None = None
        self._held: set[int] = set()  # delivery tags never to acknowledge (hold)
        self.unacknowledged = 0  # deliveries received and not acknowledged yet

    async def open(self) -> None:
        settings = self._settings
        self._connection, self._node = await connect(settings.amqp_url, name=f"consumer of {settings.queue}")
        self._connection.close_callbacks.add(self._on_close)
        try:
            channel = await self._connection.channel(publisher_confirms=False)
            # Declaring may close (and reopen) the channel once, see _declare_queue: only watch
            # the channel for closes once the topology stands.
            queue = await declare_topology(channel, settings)
            channel.close_callbacks.add(self._on_close)
            await channel.set_qos(prefetch_count=settings.prefetch)
            # on_return_raises: a dead letter the broker cannot route (DLQ deleted under us) must
            # fail, not count as delivered while the original is acked away.
            self._dlq_channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            self._dlq_channel.close_callbacks.add(self._on_close)
            # The broker can cancel a consumer and leave its channel open (queue deleted, and so
            # on): nothing would arrive again while all looks well.  Treat it as a lost session,
            # so the service opens a new one, declares the topology again and consumes.
            self._channel = underlay = await channel.get_underlay_channel()
            underlay.on_consumer_cancel_callbacks.add(self._on_consumer_cancelled)
            # Consumed on the channel under aio-pika: an ``IncomingMessage`` per delivery (its
            # properties decoded a second time, then locked) was a fifth of the drain's cost, and
            # the session needs only the frames' own values (bench/drain.py).
            consume_ok = await underlay.basic_consume(queue.name, self._receive)
            self._consumer_tag = consume_ok.consumer_tag
        except CONNECTION_ERRORS as exc:
            await self.close()
            raise SessionLost("rabbitmq", settings.amqp_url, str(exc) or type(exc).__name__) from None
        log.info("consuming from queue %s (prefetch %d)", settings.queue, settings.prefetch)

    def _lost_now(self) -> None:
        self._lost.set()
        self._arrived.set()  # wakes a wait for deliveries, which then sees the loss

    def _on_close(self, _sender: Any, exc: BaseException | None = None) -> None:
        if not self._lost.is_set():
            log.warning("rabbitmq session closed: %s", exc or "closed")
            if exc is not None and self._node is not None:  # not our own close: try another node next
                node_failed(self._settings.amqp_url, self._node)
        self._lost_now()

    def _on_consumer_cancelled(self, _frame: Any) -> None:
        if not self._lost.is_set():
            log.warning("rabbitmq cancelled our consumer (was queue %s deleted?)", self._settings.queue)
        self._lost_now()

    async def _receive(self, message: DeliveredMessage) -> None:
        deliver, properties = message.delivery, message.header.properties
        if not isinstance(deliver, Basic.Deliver) or deliver.delivery_tag is None:
            raise TypeError(f"a consumer was handed {deliver!r}")  # never: aiormq hands it Deliver frames
        # The inbox holds at most `prefetch` deliveries: the broker sends no more until we ack.
        self.unacknowledged += 1
        self._inbox.append(
            Delivery(
                body=message.body,
                content_type=properties.content_type,
                routing_key=deliver.routing_key or "",
                exchange=deliver.exchange or "",
                headers=dict(properties.headers or {}),
                received_s=time.monotonic(),
                delivery_tag=deliver.delivery_tag,
                properties=properties,
            )
        )
        self._arrived.set()

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def next_batch(self, batch_size: int, batch_wait_ms: int) -> list[Delivery]:
        """Up to ``batch_size`` deliveries, as soon as the first one is in.

        The batch takes what has arrived, and what the connection has already read (one turn of
        the event loop); then, with ``batch_wait_ms`` 0, it goes: a batch grows only while more is
        arriving, so an idle queue costs no wait and a backlog still fills whole batches.  With
        ``batch_wait_ms`` above 0 it waits up to that long after the first for more."""
        await self._wait_for_delivery(None)
        deadline = time.monotonic() + batch_wait_ms / 1000
        batch: list[Delivery] = []
        while len(batch) < batch_size:
            if self._inbox:
                batch.append(self._inbox.popleft())
                continue
            # Deliveries whose frames are read already land in the inbox within a few turns of the
            # loop (frame reader, channel, consumer callback); under a backlog this fills batches.
            for _ in range(_TURNS_FOR_MORE):
                await asyncio.sleep(0)
                if self._inbox:
                    break
            if self._inbox:
                continue
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0 or not await self._wait_for_delivery(remaining_s):
                break
        return batch

    async def _wait_for_delivery(self, timeout_s: float | None) -> bool:
        # Waits on an event, never on a get: cancelling an event wait cannot swallow a delivery,
        # and a swallowed delivery would later be acked unprocessed by a multiple=True ack.  A
        # loss sets the same event (``_lost_now``), so one wait sees either.
        while not self._inbox:
            if self._lost.is_set():
                raise SessionLost("rabbitmq", self._settings.amqp_url, "connection lost")
            self._arrived.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._arrived.wait()
            except TimeoutError:
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
        """Publish to the DLQ with the original body, properties and headers; returns once confirmed.

        A header that cannot be written back (no AMQP type carries it) costs the headers, never the
        letter: it goes without them, and its reason says so."""
        assert self._dlq_channel is not None
        ours = {
            ERROR_HEADER: reason,
            "x-original-exchange": delivery.exchange,
            "x-original-routing-key": delivery.routing_key,
            "x-dead-lettered-at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        try:
            properties = republish.dead_letter_properties(delivery.properties, ours)
            properties.marshal()  # here, before anything is sent, if a header cannot be written
        except (TypeError, ValueError) as exc:
            log.warning("dead letter without its original headers: %s", exc)
            ours[ERROR_HEADER] = f"{reason}; original headers not kept: {exc}"[:1000]
            properties = republish.dead_letter_properties(delivery.properties, ours, keep_headers=False)
        publishing = republish.publish(self._dlq_channel, delivery.body, properties, self._settings.dlq)
        try:
            await self.guard(publishing)
        except aio_pika.exceptions.PublishError:
            # Routed nowhere: end the session; the next one declares the DLQ again and the batch,
            # unacknowledged, is redelivered and dead-lettered there.
            self._lost_now()
            raise SessionLost(
                "rabbitmq", self._settings.amqp_url, f"dead-letter queue {self._settings.dlq} is missing"
            ) from None
        except aiormq.exceptions.DeliveryError as exc:
            # Refused (e.g. a full DLQ with reject-publish): wait and try again, never ack the original.
            raise Unavailable(
                "rabbitmq", self._settings.amqp_url, f"the dead-letter queue refused a message: {exc}"
            ) from None
        except CONNECTION_ERRORS as exc:
            raise SessionLost("rabbitmq", self._settings.amqp_url, str(exc) or type(exc).__name__) from None

    def hold(self, deliveries: Iterable[Delivery]) -> None:
        """Never acknowledge these (they could not be dead-lettered); they return to the queue
        when the session ends."""
        self._held.update(delivery.delivery_tag for delivery in deliveries)

    async def ack(self, batch: Sequence[Delivery]) -> None:
        """Acknowledge the batch: one frame (multiple=True on its last delivery), or one per
        delivery once any delivery of the session is held."""
        if not batch:
            return
        if self._lost.is_set():
            raise SessionLost("rabbitmq", self._settings.amqp_url, "cannot ack on a lost channel")
        assert self._channel is not None
        try:
            if not self._held:
                await self._channel.basic_ack(batch[-1].delivery_tag, multiple=True)
                self.unacknowledged -= len(batch)
                return
            for delivery in batch:
                if delivery.delivery_tag not in self._held:
                    await self._channel.basic_ack(delivery.delivery_tag)
                    self.unacknowledged -= 1
        except CONNECTION_ERRORS as exc:
            raise SessionLost("rabbitmq", self._settings.amqp_url, str(exc) or type(exc).__name__) from None

    async def stop_consuming(self) -> None:
        """Cancel the consumer: the broker sends no more; unacked deliveries return on close."""
        if self._channel is not None and self._consumer_tag is not None and not self._lost.is_set():
            try:
                await asyncio.wait_for(self._channel.basic_cancel(self._consumer_tag), 2)
            except CONNECTION_ERRORS:
                pass
            self._consumer_tag = None

    async def close(self) -> None:
        connection, self._connection = self._connection, None
        self._lost_now()
        if connection is not None and not connection.is_closed:
            try:
                # Bounded by the service's stop budget, which cancels this wait when it is spent.
                await asyncio.wait_for(connection.close(), 9)
            except CONNECTION_ERRORS:
                pass
