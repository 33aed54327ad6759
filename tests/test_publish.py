"""``refresh-cache`` and ``emit`` against real RabbitMQ, Postgres and Redis: what the producers
publish, its effect on the caches and the read model, the commands' exit status.

The commands run as operators run them (``python -m indexer`` in a subprocess) against an indexer
running in this process; what they publish is read back from a queue the test binds itself.
"""

from __future__ import annotations

import re
import socket
import uuid
from datetime import datetime, timedelta, timezone

import aio_pika
import aiormq
import pytest
import redis.asyncio

from indexer.config import Settings
from indexer.events import core_pb2, mention_notification_pb2, trigger_pb2
from indexer.timestamps import parse_timestamp
from tests.support.amqp import declare_exchange, take_all, tap
from tests.support.cache_fixtures import fill
from tests.support.commands import call_main, cli_env
from tests.support.process import arun_cli
from tests.support.service import acknowledged, rows, running

EVENT_ID = re.compile(r"\(.*event ([0-9a-f-]{36})\)$")


def event_of(message: aio_pika.abc.AbstractIncomingMessage) -> core_pb2.VtEvent:
    assert message.content_type == "application/x-protobuf"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    return core_pb2.VtEvent.FromString(message.body)


def assert_core_as_the_seed_describes(event: core_pb2.VtEvent, organization_id: str, before: datetime) -> None:
    core = event.core
    assert uuid.UUID(core.id).version == 4 and str(uuid.UUID(core.id)) == core.id
    # RFC1123Z, exactly Go's layout "Mon, 02 Jan 2006 15:04:05 -0700".
    stamp = datetime.strptime(core.timestamp, "%a, %d %b %Y %H:%M:%S %z")
    assert re.fullmatch(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} [+-]\d{4}", core.timestamp)
    assert before - timedelta(seconds=1) <= stamp <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert core.service_name == socket.gethostname()
    assert core.application_id == "system"
    assert core.organization_id == organization_id


# --------------------------------------------------------------------------- refresh-cache


async def test_refresh_cache_flushes_one_organization_then_every_organization(settings: Settings) -> None:
    env = cli_env(settings)
    r = redis.asyncio.Redis.from_url(settings.redis_url)
    outside = [f"{settings.cache_prefix}x:{{2}}:list", f"other-{settings.cache_prefix}:{{2}}:list"]
    for key in outside:
        await r.set(key, b"keep")
    try:
        async with running(settings) as service:
            keys = {org: [await fill(settings, org, name) for name in ("list", "count")] for org in (1, 2, 3)}

            result = await arun_cli(env, "refresh-cache", "--org", "2")
            assert result.code == 0, result.err
            assert result.out.startswith(f"published TriggerCacheRefresh for organization 2 to exchange {settings.exchange}")
            await acknowledged(service, 1)
            assert await r.exists(*keys[2]) == 0
            assert await r.exists(*keys[1]) == 2 and await r.exists(*keys[3]) == 2

            result = await arun_cli(env, "refresh-cache")
            assert result.code == 0, result.err
            assert "for all organizations" in result.out
            await acknowledged(service, 2)
            assert await r.exists(*keys[1], *keys[3]) == 0
        assert [await r.get(key) for key in outside] == [b"keep", b"keep"]
    finally:
        await r.delete(*outside)
        await r.aclose()


@pytest.mark.parametrize("org", ["42", None])
async def test_refresh_cache_publishes_the_envelope_the_seed_describes(settings: Settings, org: str | None) -> None:
    before = datetime.now(timezone.utc)
    async with tap(settings) as queue:
        result = await arun_cli(cli_env(settings), "refresh-cache", *(["--org", org] if org else []))
        assert result.code == 0, result.err
        (message,) = await take_all(queue, 1)
    assert message.routing_key == "events.TriggerCacheRefresh"
    event = event_of(message)
    assert_core_as_the_seed_describes(event, org or "", before)
    assert EVENT_ID.search(result.out.strip())[1] == event.core.id
    assert event.data.type_url == "type.googleapis.com/events.TriggerCacheRefresh"
    refresh = trigger_pb2.TriggerCacheRefresh()
    assert event.data.Unpack(refresh)


async def test_refresh_cache_exits_1_when_no_queue_is_bound_for_it(settings: Settings) -> None:
    await declare_exchange(settings.amqp_url, settings.exchange)
    async with tap(settings, binding="events.MentionInserted") as queue:  # bound, but not for this key
        result = await arun_cli(cli_env(settings), "refresh-cache", "--org", "7")
        assert await queue.get(fail=False) is None
    assert result.code == 1
    assert (f"message to exchange '{settings.exchange}' with routing key 'events.TriggerCacheRefresh' "
            "was not routed: no queue is bound for it") in result.err
    assert result.out == ""


async def test_refresh_cache_exits_1_when_the_exchange_does_not_exist_and_does_not_create_it(
    settings: Settings,
) -> None:
    result = await arun_cli(cli_env(settings), "refresh-cache")
    assert result.code == 1
    assert f"exchange '{settings.exchange}'" in result.err and "exchange does not exist" in result.err
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
            await channel.get_exchange(settings.exchange, ensure=True)


@pytest.mark.parametrize("command", [["refresh-cache"], ["emit", "inserted", "--mention-id", "1"]], ids=" ".join)
@pytest.mark.parametrize("org", ["abc", "*", "-1", "0", "007", "+7", "", " 3", "1e3", "0x1F", "٣", str(2**63)])
def test_an_organization_that_is_not_a_positive_decimal_id_exits_2(
    command: list[str], org: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = call_main([*command, "--org", org], cli_env(settings), monkeypatch, capsys)
    assert result.code == 2, result
    assert "argument --org: must be a decimal organization id" in result.err


# --------------------------------------------------------------------------- emit


async def test_emit_changes_the_read_model_in_version_order(settings: Settings) -> None:
    env = cli_env(settings)

    async def emit(*args: str) -> str:
        result = await arun_cli(env, "emit", *args)
        assert result.code == 0, result.err
        return result.out

    async with running(settings) as service:
        out = await emit("inserted", "--mention-id", "7", "--org", "10",
                         "--mention-date", "2026-01-01T00:00:00Z", "--transaction-timestamp", "Thu, 01 Jan 2026 12:00:00 UTC")
        assert out.startswith("published MentionInserted mention 7 organization 10 at 2026-01-01T12:00:00Z")
        await acknowledged(service, 1)
        t0 = datetime(2026, 1, 1, 12, tzinfo=timezone.utc)  # what the timestamp given above stands for
        assert (await rows(settings))[7] == (10, datetime(2026, 1, 1, tzinfo=timezone.utc), t0, False)

        # Update that moves the mention to organization 11 (RFC1123Z with an offset).
        await emit("updated", "--mention-id", "7", "--org", "11", "--mention-date", "2026-01-02T00:00:00Z",
                   "--transaction-timestamp", "Thu, 01 Jan 2026 13:00:10 +0100")
        await acknowledged(service, 2)
        assert (await rows(settings))[7] == (11, datetime(2026, 1, 2, tzinfo=timezone.utc), t0 + timedelta(seconds=10), False)

        # Delete: a tombstone, sub-second precision kept.
        await emit("deleted", "--mention-id", "7", "--org", "11", "--transaction-timestamp", "2026-01-01T12:00:20.123456Z")
        await acknowledged(service, 3)
        deleted = (await rows(settings))[7]
        assert deleted[3] is True
        assert deleted[0] == 11 and deleted[2] == t0 + timedelta(seconds=20, microseconds=123456)

        # A late insert (older than the delete) must not resurrect it; mention 8, published after
        # it, is applied beside.
        await emit("inserted", "--mention-id", "7", "--org", "10", "--transaction-timestamp", "2026-01-01T12:00:15Z")
        await emit("inserted", "--mention-id", "8", "--org", "10", "--transaction-timestamp", "2026-01-01T12:00:15Z")
        await acknowledged(service, 5)
        table = await rows(settings)
        assert 8 in table
        assert table[7] == deleted


async def test_emit_publishes_the_envelope_the_seed_describes_with_now_as_default_timestamp(settings: Settings) -> None:
    before = datetime.now(timezone.utc)
    async with tap(settings) as queue:
        result = await arun_cli(cli_env(settings), "emit", "updated", "--mention-id", "9223372036854775807", "--org", "5")
        after = datetime.now(timezone.utc)
        assert result.code == 0, result.err
        (message,) = await take_all(queue, 1)
    assert message.routing_key == "events.MentionUpdated"
    event = event_of(message)
    assert_core_as_the_seed_describes(event, "5", before)
    assert EVENT_ID.search(result.out.strip())[1] == event.core.id
    assert event.data.type_url == "type.googleapis.com/events.MentionUpdated"
    updated = mention_notification_pb2.MentionUpdated()
    assert event.data.Unpack(updated)
    payload = updated.payload
    assert (payload.mention_id, payload.organization_id, payload.mention_date) == (2**63 - 1, 5, "")
    assert before <= parse_timestamp(payload.transaction_timestamp) <= after


@pytest.mark.parametrize("flag", ["--transaction-timestamp", "--mention-date"])
@pytest.mark.parametrize(
    "value",
    [
        "yesterday",
        "",
        "2026-02-30T00:00:00Z",                 # no such day
        "2026-01-01T00:00:00",                  # no zone
        "Thu, 01 Jan 2026 12:00:00 EST",        # ambiguous zone name
        "Fri, 01 Jan 2026 12:00:00 UTC",        # wrong weekday
        "2026-06-30T23:59:60Z",                 # leap second
        "0001-01-01T00:00:00+05:00",            # before year 1 in UTC
    ],
)
def test_emit_with_a_bad_timestamp_exits_2_naming_the_flag(
    flag: str, value: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # No exchange exists: had it tried to publish, the exit status would be 1.
    argv = ["emit", "inserted", "--mention-id", "1", "--org", "1", flag, value]
    result = call_main(argv, cli_env(settings), monkeypatch, capsys)
    assert result.code == 2, result
    assert result.err.startswith(f"mention-indexer emit: {flag}: ")
    assert result.out == ""


@pytest.mark.parametrize("mention_id", ["0", "-5", "x", str(2**63)])
def test_emit_with_a_mention_id_out_of_range_exits_2(
    mention_id: str, settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = call_main(["emit", "deleted", "--mention-id", mention_id, "--org", "1"], cli_env(settings), monkeypatch, capsys)
    assert result.code == 2
    assert "argument --mention-id: must be a decimal mention id" in result.err
