"""Fuzzing whole deliveries through a running indexer: random properties, header tables of every
AMQP type and hostile bodies are published to its queue; afterwards every delivery must have been
applied, ignored or dead-lettered with a reason (nothing else), the process must still run, and
each dead letter must equal its original (body, properties, every header).

The expected outcome of each delivery is the codec's own answer (pure, tested apart), so the fuzz
checks the delivery path around it: consuming, dead-lettering, acknowledging.  Used by
tests/test_delivery_fuzz.py (a few thousand cases in CI) and bench/fuzz_deliveries.py (long runs).
"""

from __future__ import annotations

import asyncio
import collections
import time
from dataclasses import dataclass, field
import aio_pika

from indexer.changes import CacheRefresh, Change
from indexer.errors import Refused
from indexer.ingest import wire
from indexer.ingest.republish import ExactProperties
from tests.support.amqp import drain
from tests.support.deliveries import HUGE_BYTES, Delivery, same
from tests.support.process import Indexer

OUR_HEADERS = {
    "x-indexer-error",
    "x-original-exchange",
    "x-original-routing-key",
    "x-dead-lettered-at",
    "x-original-expiration",
    "x-delivery-count",
}


def expected(delivery: Delivery) -> str:
    try:
        decoded = wire.decode(delivery.body, delivery.content_type, max_bytes=HUGE_BYTES)
    except Refused:
        return "dead_lettered"
    if isinstance(decoded, Change):
        return "change"
    return "refresh" if isinstance(decoded, CacheRefresh) else "ignored"


@dataclass
class Tally:
    cases: int = 0
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    letters_checked: int = 0
    seconds: float = 0.0


def _counted(indexer: Indexer) -> collections.Counter[str]:
    metrics = indexer.metrics()
    counts: collections.Counter[str] = collections.Counter()
    for name, value in metrics.items():
        if name.startswith("mention_indexer_messages_total{"):
            outcome = name.split('"')[1]
            counts["change" if outcome in ("applied", "duplicate", "stale") else outcome] += int(value)
    return counts


async def publish(amqp_url: str, exchange: str, deliveries: list[Delivery], first_id: int) -> None:
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        underlay = await channel.get_underlay_channel()
        publishing = []
        for number, delivery in enumerate(deliveries, start=first_id):
            properties = ExactProperties(
                content_type=delivery.content_type,
                headers=delivery.headers,
                message_id=f"fuzz-{number}",
                **delivery.properties,
            )
            publishing.append(
                underlay.basic_publish(
                    delivery.body,
                    exchange=exchange,
                    routing_key="events.MentionInserted",
                    properties=properties,
                    mandatory=True,
                )
            )
        await asyncio.gather(*publishing)  # in order on the wire; the confirms are awaited together


async def one_round(
    indexer: Indexer, amqp_url: str, exchange: str, dlq: str, deliveries: list[Delivery], tally: Tally
) -> None:
    """Publish ``deliveries``, wait until the indexer accounted for every one, check the letters."""
    started = time.monotonic()
    before = _counted(indexer)
    first_id = tally.cases
    await publish(amqp_url, exchange, deliveries, first_id)
    want = collections.Counter(expected(d) for d in deliveries)
    deadline = time.monotonic() + 60
    while True:
        assert indexer.running, f"the indexer died\n{indexer.tail()}"
        counted = await asyncio.to_thread(_counted, indexer)
        if sum(counted.values()) - sum(before.values()) >= len(deliveries):
            break
        assert time.monotonic() < deadline, f"not every delivery was accounted for: {counted - before} vs {want}"
        await asyncio.sleep(0.02)
    assert counted - before == want, (counted - before, want)
    letters = {letter.message_id: letter for letter in await drain(amqp_url, dlq)}
    sent = {f"fuzz-{n}": d for n, d in enumerate(deliveries, start=first_id) if expected(d) == "dead_lettered"}
    assert set(letters) == set(sent), (sorted(letters), sorted(sent))
    for message_id, original in sent.items():
        _assert_same_letter(letters[message_id], original)
    tally.cases += len(deliveries)
    tally.outcomes.update(want)
    tally.letters_checked += len(sent)
    tally.seconds += time.monotonic() - started


def _assert_same_letter(letter: aio_pika.abc.AbstractIncomingMessage, original: Delivery) -> None:
    assert letter.body == original.body
    headers = dict(letter.headers or {})
    assert headers.get("x-indexer-error"), "a dead letter says why"
    kept = {k: v for k, v in headers.items() if k not in OUR_HEADERS}
    assert same(kept, original.headers), (kept, original.headers)
    props = letter.properties
    assert props.content_type == (original.content_type or None)
    for name, value in original.properties.items():
        if name == "expiration":
            assert headers["x-original-expiration"] == value
        elif name == "delivery_mode":
            assert props.delivery_mode == 2  # a dead letter is persistent
        else:
            assert getattr(props, name) == value, (name, getattr(props, name), value)
