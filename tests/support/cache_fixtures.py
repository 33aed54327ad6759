"""Fixtures and helpers the cache suites share: the test's key prefix, a plain Redis client, the
invalidator and the readers; filling a cache through the helper; keys planted to prove they are
left alone; retrying while Redis is unavailable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
import redis

from indexer.cache import AsyncCacheReader, CacheInvalidator, data_key
from indexer.config import Settings
from indexer.errors import Unavailable

T = TypeVar("T")
UNTOUCHED = b"untouched"


@pytest.fixture
def prefix(settings: Settings) -> str:
    return settings.cache_prefix


@pytest.fixture
def admin(settings: Settings) -> Iterator[redis.Redis]:
    """A plain client, as another service (or an operator) would use."""
    client = redis.Redis.from_url(settings.redis_url)
    yield client
    client.close()


@pytest.fixture
async def invalidator(settings: Settings) -> AsyncIterator[CacheInvalidator]:
    async with CacheInvalidator.from_settings(settings) as inv:
        await inv.start()  # as the service does first: starts the key tracker and waits for it
        yield inv


@pytest.fixture
async def reader(settings: Settings) -> AsyncIterator[AsyncCacheReader]:
    async with AsyncCacheReader.from_settings(settings) as r:
        yield r


async def fill(settings: Settings, org: int, key: str, value: bytes = b"cached") -> str:
    """Cache ``value`` for ``org`` through the project's helper; the full Redis key."""
    async with AsyncCacheReader(settings.redis_url, settings.cache_prefix) as cache_reader:
        await cache_reader.get_or_fill(org, key, lambda: value)
    return data_key(settings.cache_prefix, org, key)


@contextmanager
def planted(admin: redis.Redis, names: list[str]) -> Iterator[list[str]]:
    """``names`` set (to ``UNTOUCHED``) by someone else meanwhile, deleted afterwards."""
    for name in names:
        admin.set(name, UNTOUCHED)
    try:
        yield names
    finally:
        admin.delete(*names)


def assert_untouched(admin: redis.Redis, names: list[str]) -> None:
    assert [admin.get(name) for name in names] == [UNTOUCHED] * len(names)


async def retrying(call: Callable[[], Awaitable[T]], *, within_s: float = 5.0) -> tuple[T, int]:
    """``call()`` again while it raises ``Unavailable``, as the caller's retry loop does (holding
    the ack meanwhile); its result and how many times it was unavailable."""
    deadline = asyncio.get_running_loop().time() + within_s
    unavailable = 0
    while True:
        try:
            return await call(), unavailable
        except Unavailable as exc:
            assert exc.service == "redis"
            unavailable += 1
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.01)


def tracker_connection(admin: redis.Redis, inv: CacheInvalidator) -> dict[str, Any]:
    """The invalidator's subscribed connection, found by its name: other processes share Redis."""
    mine = [c for c in admin.client_list() if c.get("name") == inv.tracker.client_name]
    assert len(mine) == 1, mine
    return mine[0]
