"""Publishing one message as a producer: confirms, ``mandatory``, success only when routed."""

from __future__ import annotations

from typing import Any

import aio_pika
import aiormq

from indexer.errors import IndexerError, Unavailable
from indexer.ingest.topology import CONNECTION_ERRORS, connect


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
    connection, _ = await connect(url, timeout_s=timeout_s)
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
        except CONNECTION_ERRORS as exc:
            raise Unavailable("rabbitmq", url, str(exc) or type(exc).__name__) from None


class Unrouted(IndexerError):
    """The broker could route the message to no queue (or the exchange is missing)."""

    def __init__(self, exchange: str, routing_key: str, detail: str = "no queue is bound for it") -> None:
        self.exchange = exchange
        self.routing_key = routing_key
        super().__init__(f"message to exchange {exchange!r} with routing key {routing_key!r} was not routed: {detail}")
