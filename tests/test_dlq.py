"""``dlq list|replay|purge`` against real RabbitMQ, Postgres and Redis: the dead letters of the live
path, and the commands' output and exit status.

The realistic cycle: an indexer with a small ``INDEXER_MAX_MESSAGE_BYTES`` dead-letters valid but
large events; the operator lists them, raises the limit, restarts, replays; they are applied.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
from datetime import datetime, timezone
from typing import Any

import aio_pika
import pytest
from google.protobuf import json_format

from indexer.changes import Kind
from indexer.config import Settings
from indexer.ingest import queue_arguments, wire
from tests.support.amqp import drain, publish_raw, ready_count
from tests.support.clock import T0, at
from tests.support.commands import call_main, cli_env
from tests.support.process import arun_cli, run_cli, spawn
from tests.support.service import acknowledged, rows, running
from tests.support.waiting import eventually

SMALL_LIMIT = 1024


def padded_event(kind: Kind, mention_id: int, org: int, ts: datetime) -> Any:
    """A valid event whose body is well over ``SMALL_LIMIT`` (a long ``Core.user_id``)."""
    return wire.build_event(wire.mention_message(kind, mention_id, org, T0, ts), organization_id=str(org), user_id="u" * 2000)


async def seed_dlq(settings: Settings, letters: list[tuple[bytes, dict[str, Any]]]) -> None:
    """Put letters straight into the DLQ, declared as the indexer declares it (confirmed, in order)."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(settings.dlq, durable=True, arguments=queue_arguments(settings))
        # Confirms are awaited together: one round trip, not one per letter.
        await asyncio.gather(*(
            channel.default_exchange.publish(
                aio_pika.Message(body, headers=headers, content_type=wire.CONTENT_TYPE), settings.dlq
            )
            for body, headers in letters
        ))
    assert await ready_count(settings.amqp_url, settings.dlq) == len(letters)


async def bind_queue(settings: Settings, *routing_keys: str) -> None:
    """The exchange and the test's queue bound to ``routing_keys``: where replayed letters land."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(settings.queue, durable=True, arguments=queue_arguments(settings))
        for key in routing_keys:
            await queue.bind(exchange, key)


def letter(body: bytes, routing_key: str = "events.MentionInserted", reason: str = "test") -> tuple[bytes, dict[str, Any]]:
    return body, {"x-indexer-error": reason, "x-original-routing-key": routing_key, "x-original-exchange": "x",
                  "x-dead-lettered-at": datetime.now(timezone.utc).isoformat(timespec="seconds")}


async def test_oversized_events_are_listed_then_replayed_once_the_limit_is_raised(settings: Settings) -> None:
    env = cli_env(settings)
    binary = [padded_event(Kind.INSERTED, 1, 5, at(1)), padded_event(Kind.UPDATED, 2, 6, at(2))]
    as_json = json_format.MessageToJson(padded_event(Kind.INSERTED, 3, 7, at(3))).encode()
    sizes = sorted([len(wire.encode(e)) for e in binary] + [len(as_json)])
    assert sizes[0] > SMALL_LIMIT

    async with running(settings.model_copy(update={"max_message_bytes": SMALL_LIMIT})) as service:
        await publish_raw(settings.amqp_url, settings.exchange, "events.MentionInserted", [wire.encode(binary[0])])
        await publish_raw(settings.amqp_url, settings.exchange, "events.MentionUpdated", [wire.encode(binary[1])])
        await publish_raw(settings.amqp_url, settings.exchange, "events.MentionInserted", [as_json],
                          content_type="application/json")
        small = wire.build_event(wire.mention_message(Kind.INSERTED, 4, 8, T0, at(4)), organization_id="8")
        await publish_raw(settings.amqp_url, settings.exchange, "events.MentionInserted", [wire.encode(small)])
        await acknowledged(service, 4)  # three of them dead-lettered
    assert await ready_count(settings.amqp_url, settings.dlq) == 3
    assert set(await rows(settings)) == {4}

    result = await arun_cli(env, "dlq", "list")
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0] == f"3 dead letter(s) in {settings.dlq}"
    headers, summaries = lines[1::2], lines[2::2]
    assert len(headers) == len(summaries) == 3
    for line in headers:
        assert re.fullmatch(
            r"\s+\d\. age\s+\d+s  key events\.Mention(Inserted|Updated)  "
            rf"reason: body of \d+ bytes is over the limit of {SMALL_LIMIT} bytes", line
        ), line
    assert sorted(int(m) for m in re.findall(r"body of (\d+) bytes", result.out)) == sizes
    assert sorted(s.strip() for s in summaries) == [
        "MentionInserted mention 1 org 5 at 2024-01-01T12:00:01+00:00",
        "MentionInserted mention 3 org 7 at 2024-01-01T12:00:03+00:00",
        "MentionUpdated mention 2 org 6 at 2024-01-01T12:00:02+00:00",
    ]
    assert await ready_count(settings.amqp_url, settings.dlq) == 3  # listing leaves them in place

    result = await arun_cli(env, "dlq", "list", "--limit", "1")
    assert result.code == 0 and result.out.splitlines()[0] == f"3 dead letter(s) in {settings.dlq}"
    assert result.out.rstrip().endswith("… 2 more (--limit)") and len(result.out.splitlines()) == 4

    async with running(settings) as service:  # the fix: the default limit
        result = await arun_cli(env, "dlq", "replay", "--limit", "1")
        assert result.code == 0, result.err
        assert result.out.strip() == f"replayed 1 dead letter(s) to exchange {settings.exchange}; 2 left in {settings.dlq}"
        await acknowledged(service, 1)
        assert len(await rows(settings)) == 2
        assert await ready_count(settings.amqp_url, settings.dlq) == 2

        result = await arun_cli(env, "dlq", "replay")
        assert result.code == 0, result.err
        assert result.out.strip() == f"replayed 2 dead letter(s) to exchange {settings.exchange}; 0 left in {settings.dlq}"
        await acknowledged(service, 3)
        assert len(await rows(settings)) == 4
        assert await ready_count(settings.amqp_url, settings.queue) == 0
    table = await rows(settings)
    assert {m: table[m][0] for m in (1, 2, 3, 4)} == {1: 5, 2: 6, 3: 7, 4: 8}
    assert table[3][2] == at(3)  # the JSON letter was replayed as JSON and applied
    assert await ready_count(settings.amqp_url, settings.dlq) == 0  # none came back


async def test_list_describes_letters_that_cannot_be_used(settings: Settings) -> None:
    refresh = wire.build_event(wire.refresh_message())
    refresh.core.organization_id = "*"
    await seed_dlq(settings, [
        letter(b"\xff\x00garbage", reason="not a protobuf VtEvent"),
        letter(wire.encode(refresh), "events.TriggerCacheRefresh", "organization_id is not a decimal integer: '*'"),
    ])
    result = await arun_cli(cli_env(settings), "dlq", "list")
    assert result.code == 0, result.err
    assert "key events.TriggerCacheRefresh  reason: organization_id is not a decimal integer: '*'" in result.out
    assert "undecodable (not a protobuf VtEvent" in result.out and ", 9 bytes" in result.out
    assert "unusable (organization_id is not a decimal integer: '*')" in result.out


async def test_replay_stops_at_an_unroutable_letter_and_keeps_it(settings: Settings) -> None:
    await bind_queue(settings, "events.MentionInserted")
    await seed_dlq(settings, [letter(b"a"), letter(b"b", "events.MentionUpdated"), letter(b"c")])
    result = await arun_cli(cli_env(settings), "dlq", "replay")
    assert result.code == 1
    assert (f"mention-indexer dlq: message to exchange '{settings.exchange}' with routing key "
            "'events.MentionUpdated' was not routed: no queue is bound for it") in result.err
    moved = [m.body for m in await drain(settings.amqp_url, settings.queue)]
    kept = sorted(m.body for m in await drain(settings.amqp_url, settings.dlq))
    assert moved == [b"a"] and kept == [b"b", b"c"]


async def test_replay_without_the_exchange_exits_1_and_keeps_every_letter(settings: Settings) -> None:
    await seed_dlq(settings, [letter(b"a"), letter(b"b")])
    result = await arun_cli(cli_env(settings), "dlq", "replay")
    assert result.code == 1
    assert "Traceback" not in result.err
    assert f"'{settings.exchange}'" in result.err
    assert await ready_count(settings.amqp_url, settings.dlq) == 2


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill -9", "Ctrl-C"])
async def test_interrupted_replay_loses_nothing(settings: Settings, how: signal.Signals) -> None:
    total = 3000
    bodies = {b"letter-%05d" % n for n in range(total)}
    await bind_queue(settings, "events.MentionInserted")
    await seed_dlq(settings, [letter(body) for body in sorted(bodies)])

    process = spawn(cli_env(settings), "dlq", "replay", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        await eventually(lambda: _at_least(settings.amqp_url, settings.queue, 50), interval_s=0.005)
        process.send_signal(how)
        out, err = await asyncio.to_thread(process.communicate, timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == (-signal.SIGKILL if how == signal.SIGKILL else 130), (out, err)
    assert b"Traceback" not in err

    async def settled_total() -> int:
        return await ready_count(settings.amqp_url, settings.queue) + await ready_count(settings.amqp_url, settings.dlq)

    # The letter in flight when interrupted comes back once the broker sees the connection gone.
    await eventually(lambda: _ge(settled_total(), total))
    left = await ready_count(settings.amqp_url, settings.dlq)
    assert 0 < left < total, "the replay was not interrupted half-way; make the DLQ longer"
    moved = [m.body for m in await drain(settings.amqp_url, settings.queue)]
    kept = [m.body for m in await drain(settings.amqp_url, settings.dlq)]
    assert set(moved) | set(kept) == bodies  # nothing lost ...
    assert total <= len(moved) + len(kept) <= total + 1  # ... and at most the one in flight twice


async def _at_least(url: str, queue: str, count: int) -> bool:
    return await ready_count(url, queue) >= count


async def _ge(value: Any, minimum: int) -> bool:
    return await value >= minimum


def test_purge_needs_yes_then_empties_the_dlq(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(seed_dlq(settings, [letter(b"a"), letter(b"b")]))
    env = cli_env(settings)
    result = call_main(["dlq", "purge"], env, monkeypatch, capsys)
    assert result.code == 2 and "add --yes to confirm" in result.err
    assert asyncio.run(ready_count(settings.amqp_url, settings.dlq)) == 2

    result = run_cli(env, "dlq", "purge", "--yes")
    assert result.code == 0, result.err
    assert result.out.strip() == f"purged 2 dead letter(s) from {settings.dlq}"
    assert asyncio.run(ready_count(settings.amqp_url, settings.dlq)) == 0


@pytest.mark.parametrize("action", [["list"], ["replay"], ["purge", "--yes"]], ids=" ".join)
def test_a_missing_dlq_exits_1_with_a_clear_message(
    action: list[str], settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    result = call_main(["dlq", *action], cli_env(settings), monkeypatch, capsys)
    assert result.code == 1
    assert result.err.strip() == f"mention-indexer dlq: dead-letter queue '{settings.dlq}' does not exist (has the indexer run?)"
    assert result.out == ""
