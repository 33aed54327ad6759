"""Names and declarations shared by every RabbitMQ user in the package: connect, the topology,
the dead-letter header and which properties a dead letter keeps."""

from __future__ import annotations

import logging
import os
from typing import Any

import aio_pika
import aiormq

from indexer.config import Settings
from indexer.errors import ConfigError, Unavailable
from indexer.redact import mask_url

log = logging.getLogger(__name__)

ERROR_HEADER = "x-indexer-error"

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    aiormq.exceptions.AMQPConnectionError,
    aiormq.exceptions.ChannelInvalidStateError,
    ConnectionError,
    OSError,  # TimeoutError too (asyncio.TimeoutError is TimeoutError since 3.11)
)


def queue_arguments(settings: Settings) -> dict[str, Any]:
    arguments: dict[str, Any] = {"x-queue-type": settings.queue_type}
    if settings.queue_type == "quorum":
        # RabbitMQ 4.x gives quorum queues a delivery limit of 20 and then drops the message (we
        # set no dead-letter exchange on purpose: our DLQ carries a reason).  A message we could
        # not finish (outage, kill -9) or an operator's `dlq list` must never cost it its life.
        arguments["x-delivery-limit"] = 2**31 - 1
    return arguments


def nodes(url: str) -> list[str]:
    """The broker URLs of ``AMQP_URL``: one, or the nodes of a cluster separated by commas."""
    return [node.strip() for node in url.split(",") if node.strip()]


# The node each list of nodes last lost or could not reach, so that the next connection starts
# with the one after it (process-wide: sessions, producers and the DLQ commands share it).
_last_failed: dict[str, str] = {}


def node_failed(url: str, node: str) -> None:
    """``node`` (of the nodes of ``url``) failed or was lost: the next connect begins after it."""
    _last_failed[url] = node


def _in_turn(url: str) -> list[str]:
    candidates = nodes(url)
    failed = _last_failed.get(url)
    if failed in candidates:
        start = (candidates.index(failed) + 1) % len(candidates)
        candidates = candidates[start:] + candidates[:start]
    return candidates


async def connect(url: str, *, timeout_s: float = 10.0, name: str = "") -> tuple[aio_pika.abc.AbstractConnection, str]:
    """A connection to the first node of ``url`` that answers, trying them in turn from the one
    after the node that failed last; (connection, the node's URL).  It is named
    ``mention-indexer <name> <pid>`` in the broker's connection list, so an operator (or
    ``rabbitmqctl close_connection``) can tell which process holds what."""
    client_properties: dict[str, Any] = {
        "connection_name": " ".join(filter(None, ("mention-indexer", name, str(os.getpid()))))
    }
    failures = []
    for node in _in_turn(url):
        try:
            connection = await aio_pika.connect(node, timeout=timeout_s, client_properties=client_properties)
        except CONNECTION_ERRORS as exc:
            node_failed(url, node)
            failures.append(f"{mask_url(node)}: {type(exc).__name__}" + (f": {exc}" if str(exc) else ""))
            continue
        return connection, node
    if len(failures) == 1:
        raise Unavailable("rabbitmq", url, failures[0].partition(": ")[2])
    raise Unavailable("rabbitmq", url, "no node answers (" + "; ".join(failures) + ")")


async def declare_topology(channel: aio_pika.abc.AbstractChannel, settings: Settings) -> aio_pika.abc.AbstractQueue:
    """Exchange, queue, bindings and dead-letter queue; idempotent, shared by every indexer."""
    try:
        exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
    except aiormq.exceptions.ChannelPreconditionFailed as exc:
        raise ConfigError(
            f"INDEXER_EXCHANGE: exchange {settings.exchange!r} at {mask_url(settings.amqp_url)} exists with other "
            f"properties ({exc}); the indexer needs a durable topic exchange: choose another name or delete that one"
        ) from None
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
