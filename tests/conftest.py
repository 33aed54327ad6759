"""Shared fixtures: every test gets its own schema, exchange, queue and key prefix, and cleans up.

Every test outside tests/unit/ is marked ``services`` here (Postgres, Redis and RabbitMQ), so
``pytest -m "not services"`` runs exactly the pure tests of tests/unit/ and needs none of them.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import psycopg
import pytest
import redis

from indexer.config import Settings, load_settings
from tests.support.services import ServiceUrls, resolve

pytest_plugins = ["tests.support.cache_fixtures", "tests.support.store", "tests.support.backfill"]
UNIT = Path(__file__).resolve().parent / "unit"
CLUSTERS = Path(__file__).resolve().parent / "clusters"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if UNIT not in item.path.resolve().parents:
            item.add_marker(pytest.mark.services)
        if CLUSTERS in item.path.resolve().parents:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceUrls]:
    with ExitStack() as stack:
        try:
            urls = resolve(stack)
        except RuntimeError as exc:
            pytest.fail(str(exc), pytrace=False)
        yield urls


@pytest.fixture
def unique() -> str:
    """A short name unique to this test, for schemas, queues and key prefixes."""
    return "t" + uuid.uuid4().hex[:12]


@pytest.fixture
def settings(services: ServiceUrls, unique: str) -> Iterator[Settings]:
    s = load_settings(
        database_url=services.database_url,
        redis_url=services.redis_url,
        amqp_url=services.amqp_url,
        schema_name=f"{unique}_idx",
        exchange=f"{unique}.events",
        queue=f"{unique}.indexer",
        cache_prefix=f"{unique}-mentions",
        http_port=0,
        batch_wait_ms=20,
        retry_initial_s=0.05,
        retry_max_s=0.5,
    )
    yield s
    _drop_schema(s.database_url, s.schema_name)
    _drop_keys(s.redis_url, s.cache_prefix)
    _drop_amqp(s.amqp_url, s.exchange, [s.queue, s.dlq])


def _drop_schema(url: str, schema: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psycopg.sql.Identifier(schema)))


def _drop_keys(url: str, prefix: str) -> None:
    # A scan is fine in a test's cleanup: the prefix is unique to the test.
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _drop_amqp(url: str, exchange: str, queues: list[str]) -> None:
    import asyncio

    import aio_pika

    async def drop() -> None:
        connection = await aio_pika.connect(url)
        async with connection:
            for name in queues:
                channel = await connection.channel()
                try:
                    await channel.queue_delete(name)
                except Exception:
                    pass
            channel = await connection.channel()
            try:
                await channel.exchange_delete(exchange)
            except Exception:
                pass

    asyncio.run(drop())
