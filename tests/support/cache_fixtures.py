"""Fixtures the cache suites share: the test's key prefix, a plain Redis client, the invalidator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from indexer.cache import CacheInvalidator
from indexer.config import Settings


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
        await inv.ping()  # as the service does first: starts the key tracker and waits for it
        yield inv
