"""The live path against real RabbitMQ, Postgres and Redis: consume → apply → invalidate → ack."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
import redis

from indexer import wire
from indexer.broker import ERROR_HEADER
from indexer.cache import CacheReader, data_key
from indexer.changes import Kind
from indexer.config import Settings
from indexer.events import job_pb2
from tests.support.amqp import drain, publish_raw, ready_count
from tests.support.commands import rows
from tests.support.service import running
from tests.support.waiting import eventually

pytestmark = pytest.mark.services
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def change_body(kind: Kind, mention_id: int, org: int | None, ts: datetime, date: datetime | None = T0) -> bytes:
    message = wire.mention_message(kind, mention_id, org or 0, date, ts)
    return wire.encode(wire.build_event(message, organization_id=str(org or "")))


def refresh_body(org: str) -> bytes:
    event = wire.build_event(wire.refresh_message())
    event.core.organization_id = org  # set after building: build_event refuses to produce garbage
    return wire.encode(event)


async def publish(settings: Settings, bodies: list[bytes], routing_key: str = "events.MentionInserted",
                  content_type: str | None = wire.CONTENT_TYPE) -> None:
    await publish_raw(settings.amqp_url, settings.exchange, routing_key, bodies, content_type=content_type)


async def settled(settings: Settings) -> None:
    """Wait until the queue is empty and stays so (everything consumed and acknowledged)."""

    async def empty() -> bool:
        return await ready_count(settings.amqp_url, settings.queue) == 0

    await eventually(empty)
    await asyncio.sleep(0.3)
    await eventually(empty)


def fill(settings: Settings, org: int, key: str, value: bytes) -> str:
    reader = CacheReader(settings.redis_url, settings.cache_prefix)
    with reader:
        reader.get_or_fill(org, key, lambda: value)
    return data_key(settings.cache_prefix, org, key)


async def test_changes_are_applied_in_version_order_whatever_the_delivery_order(settings: Settings) -> None:
    async with running(settings):
        await publish(settings, [
            change_body(Kind.DELETED, 1, 10, at(30)),
            change_body(Kind.INSERTED, 1, 10, at(10)),   # late insert: must not resurrect
            change_body(Kind.UPDATED, 1, 10, at(20)),    # late update: same
            change_body(Kind.INSERTED, 2, 10, at(10)),
            change_body(Kind.UPDATED, 2, 11, at(20), date=at(5)),  # moves to org 11
            change_body(Kind.INSERTED, 2, 10, at(10)),   # duplicate of a stale one
            change_body(Kind.DELETED, 3, 12, at(10)),
            change_body(Kind.INSERTED, 3, 12, at(40)),   # newer insert revives
        ])
        await eventually(lambda: asyncio.sleep(0, len(rows(settings)) == 3))
        await settled(settings)
    table = rows(settings)
    assert table[1] == (10, T0, at(30), True)
    assert table[2] == (11, at(5), at(20), False)
    assert table[3] == (12, T0, at(40), False)


async def test_ack_comes_after_commit_and_invalidation_of_every_touched_org(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    outside = f"{settings.cache_prefix}x:{{10}}:list"  # another prefix, same org: never touched
    r.set(outside, b"keep")
    try:
        async with running(settings):
            await publish(settings, [change_body(Kind.INSERTED, 7, 10, at(1))])
            await eventually(lambda: asyncio.sleep(0, 7 in rows(settings)))
            await settled(settings)
            keys = {org: fill(settings, org, "list", b"cached") for org in (10, 11, 12)}
            # Move mention 7 from org 10 to org 11: both are invalidated, 12 is not.
            await publish(settings, [change_body(Kind.UPDATED, 7, 11, at(2))], "events.MentionUpdated")
            await eventually(lambda: asyncio.sleep(0, rows(settings)[7][0] == 11))
            await settled(settings)
            assert r.exists(keys[10]) == 0
            assert r.exists(keys[11]) == 0
            assert r.get(keys[12]) == b"cached"
            assert r.get(outside) == b"keep"
            # A redelivered duplicate changes nothing in the table but still invalidates.
            keys[11] = fill(settings, 11, "list", b"cached")
            await publish(settings, [change_body(Kind.UPDATED, 7, 11, at(2))], "events.MentionUpdated")
            await settled(settings)
            assert r.exists(keys[11]) == 0
    finally:
        r.delete(outside)
        r.close()


async def test_trigger_cache_refresh_one_org_all_orgs_and_garbage(settings: Settings) -> None:
    r = redis.Redis.from_url(settings.redis_url)
    try:
        async with running(settings):
            keys = {org: fill(settings, org, "k", b"v") for org in (1, 2, 3)}
            await publish(settings, [refresh_body("2")], "events.TriggerCacheRefresh")
            await settled(settings)
            assert [r.exists(keys[o]) for o in (1, 2, 3)] == [1, 0, 1]

            await publish(settings, [refresh_body(bad) for bad in ("*", "1*", "0x1F", " 3")], "events.TriggerCacheRefresh")
            await settled(settings)
            assert [r.exists(keys[o]) for o in (1, 3)] == [1, 1]

            await publish(settings, [refresh_body("")], "events.TriggerCacheRefresh")
            await settled(settings)
            assert [r.exists(keys[o]) for o in (1, 2, 3)] == [0, 0, 0]
        letters = await drain(settings.amqp_url, settings.dlq)
        reasons = sorted(str(m.headers[ERROR_HEADER]) for m in letters)
        assert len(reasons) == 4 and all("organization_id is not a decimal integer" in x for x in reasons)
    finally:
        r.close()


async def test_poison_messages_are_dead_lettered_with_reasons_and_good_ones_applied(settings: Settings) -> None:
    good = [change_body(Kind.INSERTED, 100 + i, 5, at(i)) for i in range(3)]
    no_ts = wire.mention_message(Kind.INSERTED, 9, 5, T0, at(1))
    no_ts.payload.transaction_timestamp = "yesterday"
    missing_payload = wire.mention_message(Kind.INSERTED, 9, 5, T0, at(1))
    missing_payload.ClearField("payload")
    poison = {
        b"\xff\x00garbage": "not a protobuf VtEvent",
        good[0][: len(good[0]) // 2]: "not a protobuf VtEvent",  # truncated
        wire.encode(wire.build_event(no_ts)): "transaction_timestamp",
        wire.encode(wire.build_event(missing_payload)): "payload",
    }
    async with running(settings):
        await publish(settings, [good[0], *poison, good[1], good[2]])
        await eventually(lambda: asyncio.sleep(0, len(rows(settings)) == 3))
        await settled(settings)
    assert set(rows(settings)) == {100, 101, 102}
    letters = await drain(settings.amqp_url, settings.dlq)
    assert len(letters) == len(poison)
    by_body = {m.body: str(m.headers[ERROR_HEADER]) for m in letters}
    for body, fragment in poison.items():
        assert body in by_body, "a poison message was lost instead of dead-lettered"
        assert fragment in by_body[body]
    assert all(m.headers["x-original-routing-key"] == "events.MentionInserted" for m in letters)


async def test_json_messages_and_other_event_types(settings: Settings) -> None:
    from google.protobuf import json_format

    event = wire.build_event(wire.mention_message(Kind.INSERTED, 55, 8, T0, at(3)), organization_id="8")
    as_json = json_format.MessageToJson(event).encode()
    other = wire.encode(wire.build_event(job_pb2.JobCreated(job_id="j1")))
    async with running(settings) as service:
        await publish(settings, [as_json], content_type="application/json")
        await publish(settings, [other], routing_key="events.MentionInserted")
        await eventually(lambda: asyncio.sleep(0, 55 in rows(settings)))
        await settled(settings)
        assert service.metrics.messages.labels("ignored")._value.get() == 1
    assert await ready_count(settings.amqp_url, settings.dlq) == 0


async def test_consumer_comes_back_after_the_broker_closes_its_connection(settings: Settings) -> None:
    async with running(settings) as service:
        await publish(settings, [change_body(Kind.INSERTED, 1, 1, at(1))])
        await eventually(lambda: asyncio.sleep(0, 1 in rows(settings)))
        session = service._session
        assert session is not None
        await session._connection.close()  # as if the broker dropped us
        await eventually(lambda: asyncio.sleep(0, service._session not in (None, session) and service.health.snapshot()[0]))
        await publish(settings, [change_body(Kind.INSERTED, 2, 1, at(2))])
        await eventually(lambda: asyncio.sleep(0, 2 in rows(settings)))
        await settled(settings)


async def test_a_queue_declared_beforehand_with_other_arguments_is_used_as_it_is(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import aio_pika

    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(settings.queue, durable=True, arguments={"x-queue-type": "quorum"})
    async with running(settings):
        await publish(settings, [change_body(Kind.INSERTED, 1, 1, at(1))])
        await eventually(lambda: asyncio.sleep(0, 1 in rows(settings)))
        await settled(settings)
    assert f"queue {settings.queue} exists with other arguments" in caplog.text


async def test_a_dead_letter_is_never_lost_when_the_dlq_was_deleted_under_the_indexer(settings: Settings) -> None:
    import aio_pika

    async with running(settings):
        connection = await aio_pika.connect(settings.amqp_url)
        async with connection:
            channel = await connection.channel()
            await channel.queue_delete(settings.dlq)
        await publish(settings, [b"\xff\x00poison", change_body(Kind.INSERTED, 1, 1, at(1))])
        await eventually(lambda: asyncio.sleep(0, 1 in rows(settings)))
        await eventually(lambda: ready_count(settings.amqp_url, settings.dlq))
        await settled(settings)
    letters = await drain(settings.amqp_url, settings.dlq)
    assert [m.body for m in letters] == [b"\xff\x00poison"]
