"""The live path against real RabbitMQ, Postgres and Redis: consume → apply → invalidate → ack."""

from __future__ import annotations

import pytest
import redis.asyncio

from indexer.cache import stored_value
from indexer.changes import Kind
from indexer.config import Settings
from indexer.events import job_pb2
from indexer.ingest import ERROR_HEADER, wire
from tests.support.amqp import delete_queue, drain, publish_raw, ready_count
from tests.support.cache_fixtures import fill
from tests.support.clock import T0, at
from tests.support.service import acknowledged, change_body, rows, running
from tests.support.store import change
from tests.support.waiting import eventually

INS, UPD, DEL = Kind.INSERTED, Kind.UPDATED, Kind.DELETED


def body(kind: Kind, mention_id: int, org: int, ts_s: float, date_s: float = 0) -> bytes:
    return change_body(change(kind, mention_id, org, ts_s, date_s))


def refresh_body(org: str) -> bytes:
    event = wire.build_event(wire.refresh_message())
    event.core.organization_id = org  # set after building: build_event refuses to produce garbage
    return wire.encode(event)


async def publish(settings: Settings, bodies: list[bytes], routing_key: str = "events.MentionInserted",
                  content_type: str | None = wire.CONTENT_TYPE) -> None:
    await publish_raw(settings.amqp_url, settings.exchange, routing_key, bodies, content_type=content_type)


async def test_changes_are_applied_in_version_order_whatever_the_delivery_order(settings: Settings) -> None:
    async with running(settings) as service:
        await publish(settings, [
            body(DEL, 1, 10, 30),
            body(INS, 1, 10, 10),   # late insert: must not resurrect
            body(UPD, 1, 10, 20),   # late update: same
            body(INS, 2, 10, 10),
            body(UPD, 2, 11, 20, date_s=5),  # moves to org 11
            body(INS, 2, 10, 10),   # duplicate of a stale one
            body(DEL, 3, 12, 10),
            body(INS, 3, 12, 40),   # newer insert revives
        ])
        await acknowledged(service, 8)
    table = await rows(settings)
    assert len(table) == 3
    assert table[1] == (10, T0, at(30), True)
    assert table[2] == (11, at(5), at(20), False)
    assert table[3] == (12, T0, at(40), False)


async def test_ack_comes_after_commit_and_invalidation_of_every_touched_org(settings: Settings) -> None:
    r = redis.asyncio.Redis.from_url(settings.redis_url)
    outside = f"{settings.cache_prefix}x:{{10}}:list"  # another prefix, same org: never touched
    await r.set(outside, b"keep")
    try:
        async with running(settings) as service:
            await publish(settings, [body(INS, 7, 10, 1)])
            await acknowledged(service, 1)
            assert 7 in await rows(settings)
            keys = {org: await fill(settings, org, "list") for org in (10, 11, 12)}
            # Move mention 7 from org 10 to org 11: both are invalidated, 12 is not.
            await publish(settings, [body(UPD, 7, 11, 2)], "events.MentionUpdated")
            await acknowledged(service, 2)
            assert (await rows(settings))[7][0] == 11
            assert await r.exists(keys[10]) == 0
            assert await r.exists(keys[11]) == 0
            assert stored_value(await r.get(keys[12]) or b"") == b"cached"  # behind its epoch header
            assert await r.get(outside) == b"keep"
            # A redelivered duplicate changes nothing in the table but still invalidates.
            keys[11] = await fill(settings, 11, "list")
            await publish(settings, [body(UPD, 7, 11, 2)], "events.MentionUpdated")
            await acknowledged(service, 3)
            assert await r.exists(keys[11]) == 0
    finally:
        await r.delete(outside)
        await r.aclose()


async def test_trigger_cache_refresh_one_org_all_orgs_and_garbage(settings: Settings) -> None:
    r = redis.asyncio.Redis.from_url(settings.redis_url)
    try:
        async with running(settings) as service:
            keys = {org: await fill(settings, org, "k", b"v") for org in (1, 2, 3)}
            await publish(settings, [refresh_body("2")], "events.TriggerCacheRefresh")
            await acknowledged(service, 1)
            assert [await r.exists(keys[o]) for o in (1, 2, 3)] == [1, 0, 1]

            await publish(settings, [refresh_body(bad) for bad in ("*", "1*", "0x1F", " 3")], "events.TriggerCacheRefresh")
            await acknowledged(service, 5)
            assert [await r.exists(keys[o]) for o in (1, 3)] == [1, 1]

            await publish(settings, [refresh_body("")], "events.TriggerCacheRefresh")
            await acknowledged(service, 6)
            assert [await r.exists(keys[o]) for o in (1, 2, 3)] == [0, 0, 0]
        letters = await drain(settings.amqp_url, settings.dlq)
        reasons = sorted(str(m.headers[ERROR_HEADER]) for m in letters)
        assert len(reasons) == 4 and all("organization_id is not a decimal integer" in x for x in reasons)
    finally:
        await r.aclose()


async def test_poison_messages_are_dead_lettered_with_reasons_and_good_ones_applied(settings: Settings) -> None:
    good = [body(INS, 100 + i, 5, i) for i in range(3)]
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
    async with running(settings) as service:
        await publish(settings, [good[0], *poison, good[1], good[2]])
        await acknowledged(service, 3 + len(poison))
    assert set(await rows(settings)) == {100, 101, 102}
    letters = await drain(settings.amqp_url, settings.dlq)
    assert len(letters) == len(poison)
    by_body = {m.body: str(m.headers[ERROR_HEADER]) for m in letters}
    for poisoned, fragment in poison.items():
        assert poisoned in by_body, "a poison message was lost instead of dead-lettered"
        assert fragment in by_body[poisoned]
    assert all(m.headers["x-original-routing-key"] == "events.MentionInserted" for m in letters)


async def test_json_messages_and_other_event_types(settings: Settings) -> None:
    from google.protobuf import json_format

    event = wire.build_event(wire.mention_message(Kind.INSERTED, 55, 8, T0, at(3)), organization_id="8")
    as_json = json_format.MessageToJson(event).encode()
    other = wire.encode(wire.build_event(job_pb2.JobCreated(job_id="j1")))
    async with running(settings) as service:
        await publish(settings, [as_json], content_type="application/json")
        await publish(settings, [other], routing_key="events.MentionInserted")
        await acknowledged(service, 2)
        assert 55 in await rows(settings)
        assert service.metrics.messages.labels("ignored")._value.get() == 1
    assert await ready_count(settings.amqp_url, settings.dlq) == 0


async def test_consumer_comes_back_after_the_broker_closes_its_connection(settings: Settings) -> None:
    async with running(settings) as service:
        await publish(settings, [body(INS, 1, 1, 1)])
        await acknowledged(service, 1)
        assert 1 in await rows(settings)
        session = service._session
        assert session is not None
        await session._connection.close()  # as if the broker dropped us

        async def consuming_again() -> bool:
            return service._session not in (None, session) and service.health.snapshot()[0]

        await eventually(consuming_again)
        await publish(settings, [body(INS, 2, 1, 2)])
        await acknowledged(service, 2)
        assert 2 in await rows(settings)
    assert await ready_count(settings.amqp_url, settings.queue) == 0


async def test_a_queue_declared_beforehand_with_other_arguments_is_used_as_it_is(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    import aio_pika

    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(settings.queue, durable=True, arguments={"x-queue-type": "quorum"})
    async with running(settings) as service:
        await publish(settings, [body(INS, 1, 1, 1)])
        await acknowledged(service, 1)
        assert 1 in await rows(settings)
    assert f"queue {settings.queue} exists with other arguments" in caplog.text


async def test_a_dead_letter_is_never_lost_when_the_dlq_was_deleted_under_the_indexer(settings: Settings) -> None:
    async with running(settings) as service:
        await delete_queue(settings.amqp_url, settings.dlq)
        await publish(settings, [b"\xff\x00poison", body(INS, 1, 1, 1)])
        await acknowledged(service, 2)
        assert 1 in await rows(settings)
    letters = await drain(settings.amqp_url, settings.dlq)
    assert [m.body for m in letters] == [b"\xff\x00poison"]
