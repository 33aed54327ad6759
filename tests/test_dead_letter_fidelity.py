"""A dead letter, and its replay, carry every header of the original with its exact value.

The producer writes its header table by hand, as a Node.js producer (amqplib) does: every float a
64-bit ``d``.  A narrowing to ``f`` shows as ``0.1`` coming back as ``0.10000000149011612``, and a
double beyond the float32 range (``1.7976931348623157e308``, a common "no limit" sentinel) used to
stop the consumer.  Letters are read back with aio-pika, whose decoder (pamqp) reads ``d`` exactly
(pika would truncate every float to an integer).
"""

from __future__ import annotations

import asyncio
import decimal
import struct
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
from pamqp.commands import Basic

from indexer.changes import Change, Kind
from indexer.config import Settings
from indexer.ingest import wire
from indexer.ingest.dead_letters import DeadLetterQueue
from tests.support.amqp import drain
from tests.support.service import change_body, running
from tests.support.tables import aread_mentions

HEADERS: dict[str, Any] = {
    "no-limit": 1.7976931348623157e308,
    "ratio": 0.1,
    "tiny": 5e-324,
    "negative": -2.5e-300,
    "count": 7,
    "wide": 2**40,
    "below": -(2**62),
    "price": decimal.Decimal("12.34"),
    "text": "héllo",
    "nested": {"inner": 0.1, "list": [1, 0.3, "x", {"deep": 1e300}], "flag": True},
    "empty": {},
    "nothing": None,
}
GOOD = 5


def _raw(value: Any) -> bytes:
    """The AMQP field value as a Node.js producer (amqplib) writes it: every float a 64-bit ``d``.
    Written here by hand, independently of the product's encoder."""
    if isinstance(value, bool):
        return b"t" + struct.pack(">B", value)
    if isinstance(value, int):
        return b"l" + struct.pack(">q", value)
    if isinstance(value, float):
        return b"d" + struct.pack(">d", value)
    if isinstance(value, decimal.Decimal):
        sign, digits, exponent = value.as_tuple()
        return b"D" + struct.pack(">Bi", -int(exponent), int("".join(map(str, digits))) * (-1 if sign else 1))
    if isinstance(value, str):
        data = value.encode()
        return b"S" + struct.pack(">I", len(data)) + data
    if isinstance(value, dict):
        return b"F" + _raw_table(value)
    if isinstance(value, list):
        data = b"".join(_raw(item) for item in value)
        return b"A" + struct.pack(">I", len(data)) + data
    assert value is None
    return b"V"


def _raw_table(table: dict[str, Any]) -> bytes:
    data = b"".join(bytes((len(name),)) + name.encode() + _raw(value) for name, value in table.items())
    return struct.pack(">I", len(data)) + data


class _ProducerProperties(Basic.Properties):
    def encode_property(self, name: str, value: Any) -> bytes:
        return _raw_table(value) if name == "headers" else bytes(super().encode_property(name, value))


async def _publish_poison_then_good(settings: Settings) -> None:
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        poison = _ProducerProperties(
            content_type="application/x-protobuf", delivery_mode=2, headers=HEADERS, priority=3,
            correlation_id="corr-1", app_id="node-producer", expiration="64770", message_type="odd",
            message_id="poison-1",
        )
        await underlay.basic_publish(b"\xff not a protobuf", exchange=settings.exchange,
                                     routing_key="events.MentionInserted", properties=poison, mandatory=True)
        at = datetime(2026, 1, 1, tzinfo=UTC)
        exchange = await channel.get_exchange(settings.exchange)
        for n in range(1, GOOD + 1):
            change = Change(Kind.INSERTED, n, 10 + n, None, at + timedelta(seconds=n))
            message = aio_pika.Message(change_body(change), content_type=wire.CONTENT_TYPE)
            await exchange.publish(message, "events.MentionInserted", mandatory=True)


async def _mentions(settings: Settings) -> int:
    return len(await aread_mentions(settings.database_url, settings.schema_name))


async def _dlq_depth(settings: Settings) -> int:
    async with DeadLetterQueue(settings) as dlq:
        return await dlq.count()


async def test_a_poison_message_with_double_headers_is_dead_lettered_exactly_and_the_good_ones_applied(
    settings: Settings,
) -> None:
    async with running(settings) as service:
        await _publish_poison_then_good(settings)
        await asyncio.wait_for(service.wait_acknowledged(1 + GOOD), 30)
        assert await _mentions(settings) == GOOD

    [props] = await drain(settings.amqp_url, settings.dlq)
    body = props.body
    assert body == b"\xff not a protobuf"
    headers = dict(props.headers or {})
    assert headers.pop("x-indexer-error")  # the reason; its wording is the codec's
    for name, value in HEADERS.items():
        assert headers[name] == value, (name, headers[name], value)
    assert (props.priority, props.correlation_id, props.app_id, props.type) == (3, "corr-1", "node-producer", "odd")
    assert props.message_id == "poison-1"
    # 64.77 s: aio-pika truncated 64769.999… ms to 64769 before the dead letter rounded it back
    assert headers["x-original-expiration"] == "64770" and props.expiration is None


async def test_replay_republishes_the_headers_unchanged(settings: Settings) -> None:
    async with running(settings) as service:
        await _publish_poison_then_good(settings)
        await asyncio.wait_for(service.wait_acknowledged(1 + GOOD), 30)
    # Nobody consumes now: the replayed letter waits in the queue for us to read it.
    async with DeadLetterQueue(settings) as dlq:
        assert await dlq.replay(None) == 1
    assert await _dlq_depth(settings) == 0
    [props] = await drain(settings.amqp_url, settings.queue)
    body = props.body
    assert body == b"\xff not a protobuf"
    headers = dict(props.headers or {})
    headers.pop("x-delivery-count", None)  # the quorum queue annotates every delivery, ours too
    assert headers == HEADERS
    assert props.expiration == 64.77  # aio-pika shows it in seconds
    assert (props.priority, props.correlation_id, props.app_id, props.type) == (3, "corr-1", "node-producer", "odd")


async def test_the_consumer_survives_the_poison_message_across_restarts(settings: Settings) -> None:
    async with running(settings):
        pass  # declares the topology, so the messages below wait in the queue
    await _publish_poison_then_good(settings)
    for _ in range(2):  # a second start finds nothing left to choke on
        async with running(settings) as service:
            if await _mentions(settings) < GOOD:
                await asyncio.wait_for(service.wait_acknowledged(1 + GOOD), 30)
    assert await _mentions(settings) == GOOD
    assert await _dlq_depth(settings) == 1
