"""Redis clients as the cache modules want them: bounded timeouts and no retries inside.

No retries inside redis-py: the caller's policy decides, and a hidden retry would stretch every
outage report and delay the not-ready that tells an operator.
"""

from __future__ import annotations

from typing import Any, Self

import redis
import redis.asyncio
import redis.asyncio.retry
import redis.backoff
import redis.retry

TIMEOUT_S = 5.0
_HEALTH_CHECK_INTERVAL_S = 30


def _options() -> dict[str, Any]:
    return {
        "socket_connect_timeout": TIMEOUT_S,
        "socket_timeout": TIMEOUT_S,
        "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
    }


def describe(client: redis.Redis | redis.asyncio.Redis) -> str:
    """A URL for error messages, built from a client's settings; it carries no password."""
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def sync_client(client: redis.Redis | str) -> tuple[redis.Redis, str, bool]:
    """(client, URL for messages, whether we own and must close it)."""
    if isinstance(client, str):
        return (
            redis.Redis.from_url(client, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **_options()),
            client,
            True,
        )
    return client, describe(client), False


def async_client(client: redis.asyncio.Redis | str) -> tuple[redis.asyncio.Redis, str, bool]:
    """``sync_client`` for asyncio."""
    if isinstance(client, str):
        retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
        return redis.asyncio.Redis.from_url(client, retry=retry, **_options()), client, True
    return client, describe(client), False


class OwnedClient:
    """A synchronous client, closed by ``close`` only when it was built here from a URL."""

    def __init__(self, client: redis.Redis | str) -> None:
        self._client, self.url, self._owned = sync_client(client)

    def close(self) -> None:
        if self._owned:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OwnedAsyncClient:
    """``OwnedClient`` for asyncio: ``aclose`` and ``async with``."""

    def __init__(self, client: redis.asyncio.Redis | str) -> None:
        self._client, self.url, self._owned = async_client(client)

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
