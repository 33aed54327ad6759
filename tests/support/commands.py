"""Running the real command line against a test's own services, and an indexer beside it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aio_pika
import pytest

from indexer import cli
from indexer.cache import CacheReader, data_key
from indexer.config import Settings
from tests.support.waiting import eventually

_OWN_VARIABLES = ("DATABASE_URL", "SOURCE_DATABASE_URL", "REDIS_URL", "AMQP_URL")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def cli_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment of a command run for ``settings``; nothing of the outer INDEXER_* leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("INDEXER_") and k not in _OWN_VARIABLES}
    env.update(
        DATABASE_URL=settings.database_url,
        REDIS_URL=settings.redis_url,
        AMQP_URL=settings.amqp_url,
        INDEXER_SCHEMA=settings.schema_name,
        INDEXER_EXCHANGE=settings.exchange,
        INDEXER_QUEUE=settings.queue,
        INDEXER_CACHE_PREFIX=settings.cache_prefix,
        INDEXER_QUEUE_TYPE=settings.queue_type,
        INDEXER_HTTP_PORT="0",
    )
    env.update(extra)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "indexer", *args]


def run_cli(env: dict[str, str], *args: str, timeout_s: float = 30) -> Result:
    """``python -m indexer ARGS`` in a subprocess: the real entry point, exit status and streams."""
    done = subprocess.run(command(*args), env=env, capture_output=True, text=True, timeout=timeout_s)
    return Result(done.returncode, done.stdout, done.stderr)


async def arun_cli(env: dict[str, str], *args: str, timeout_s: float = 30) -> Result:
    """``run_cli`` without blocking the event loop (an indexer may be running in it)."""
    return await asyncio.to_thread(run_cli, env, *args, timeout_s=timeout_s)


def call_main(
    argv: Sequence[str],
    env: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Result:
    """``indexer.cli.main(argv)`` in this process, with ``env`` as the whole environment.

    Logging is left as pytest set it up (``main`` would replace the root handlers).
    """
    for name in list(os.environ):
        if name.startswith("INDEXER_") or name in _OWN_VARIABLES:
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(cli, "configure_logging", lambda *_: None)
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    out, err = capsys.readouterr()
    return Result(code, out, err)


def fill(settings: Settings, org: int, key: str, value: bytes = b"cached") -> str:
    """Cache ``value`` for ``org`` through the project's helper; the full Redis key."""
    with CacheReader(settings.redis_url, settings.cache_prefix) as reader:
        reader.get_or_fill(org, key, lambda: value)
    return data_key(settings.cache_prefix, org, key)


@asynccontextmanager
async def tap(settings: Settings, binding: str = "#") -> AsyncIterator[aio_pika.abc.AbstractQueue]:
    """An exclusive queue bound to the test's exchange (declared if needed); gone on exit."""
    connection = await aio_pika.connect(settings.amqp_url)
    async with connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(settings.exchange, aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, binding)
        yield queue


async def take_all(queue: aio_pika.abc.AbstractQueue, expected: int, timeout_s: float = 5) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Exactly ``expected`` messages from ``queue`` (waits for them), then checks nothing else came."""
    taken: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def got_them() -> bool:
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(message)
        return len(taken) >= expected

    await eventually(got_them, timeout_s=timeout_s)
    await asyncio.sleep(0.1)
    await got_them()
    assert len(taken) == expected, f"expected {expected} message(s), got {len(taken)}"
    return taken


def rows(settings: Settings) -> dict[int, tuple[int, object, object, bool]]:
    """The read model: mention_id → (organization_id, mention_date, transaction_timestamp, deleted)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(settings.database_url) as conn:
        result = conn.execute(
            sql.SQL("SELECT mention_id, organization_id, mention_date, transaction_timestamp, deleted FROM {}.mentions")
            .format(sql.Identifier(settings.schema_name))
        ).fetchall()
    return {r[0]: (r[1], r[2], r[3], r[4]) for r in result}
