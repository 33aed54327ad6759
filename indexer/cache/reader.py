"""The reader-side helper other services import to read and fill the caches.

It needs redis and nothing else of the indexer's dependencies: importing it imports neither
aio-pika nor psycopg.  Why a read through it never returns data older than an acknowledged
commit is told in the package doc.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Self

from indexer.cache.client import AsyncClient, ClusterMode, OwnedAsyncClient, OwnedClient, SyncClient
from indexer.cache.errors import unavailable
from indexer.cache.keys import Entry, as_bytes, check_prefix, fresh_epoch, servable, ttl_ms
from indexer.cache.scripts import FILL_LUA, READ_LUA
from indexer.errors import Unavailable

if TYPE_CHECKING:
    from indexer.config import Settings

log = logging.getLogger(__name__)


class _FromSettings:
    if TYPE_CHECKING:  # the signature both readers have, for from_settings

        def __init__(self, client: Any, prefix: str, *, ttl_s: float = 3600, cluster: ClusterMode = "auto") -> None: ...

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """A reader of the indexer's prefix and TTL, from the same settings the indexer reads."""
        return cls(
            settings.redis_url, settings.cache_prefix, ttl_s=settings.cache_ttl_s, cluster=settings.redis_cluster
        )


def _served(stored: bytes | None, epoch: bytes) -> bytes | None:
    """What a read returns of a stored value, None for a miss: a value filled under an epoch that is
    not the current one (it came back after its invalidation, e.g. restored by a failover) is
    never served; the loader runs and a fresh fill overwrites it."""
    return None if stored is None else servable(as_bytes(stored), as_bytes(epoch))


def _checked_ttl_s(ttl_s: float) -> float:
    ttl_ms(ttl_s)  # raises for a bad one
    return ttl_s


class CacheReader(OwnedClient, _FromSettings):
    """Reads and fills a prefix's caches for services that read the read model (synchronous).

    Constructed from a URL it owns its client (``close`` closes it); a client passed in stays the
    caller's.  The URL may name a single server or any node of a Redis Cluster, primary or replica
    (``cluster``: ``auto`` asks the node at the first call); a client may be a ``redis.Redis`` or
    a ``redis.cluster.RedisCluster``.
    """

    def __init__(
        self, client: SyncClient | str, prefix: str, *, ttl_s: float = 3600, cluster: ClusterMode = "auto"
    ) -> None:
        super().__init__(client, cluster=cluster)
        self._prefix, self.ttl_s = check_prefix(prefix), _checked_ttl_s(ttl_s)
        self._bind()

    def _bind(self) -> None:
        self._read, self._fill = self._client.register_script(READ_LUA), self._client.register_script(FILL_LUA)

    def get_or_fill(
        self, org: int, key: str, loader: Callable[[], bytes | str], *, ttl_s: float | None = None
    ) -> bytes:
        """The cached value of ``P:{org}:key``; on a miss ``loader()`` (reading the database) gives
        it and it is stored, unless an invalidation ran meanwhile.  Raises ``Unavailable`` if Redis
        cannot be read; a failure to store after loading only logs (the value is still correct)."""
        entry = Entry.of(self._prefix, org, key, self.ttl_s if ttl_s is None else ttl_s)
        client = self._connected()
        with unavailable(self.url):
            epoch, stored = self._read(keys=entry.slot_keys, args=[fresh_epoch()])
            served = _served(stored, epoch)
            if served is not None:
                return served
            # Registered before the fill, so invalidate_all finds every org that has keys.
            client.sadd(entry.registry, entry.org)
        value = as_bytes(loader())
        try:
            with unavailable(self.url):
                self._fill(keys=entry.slot_keys, args=[epoch, value, entry.ttl_ms])
        except Unavailable as exc:
            log.warning("cache fill skipped: %s", exc)
        return value


class AsyncCacheReader(OwnedAsyncClient, _FromSettings):
    """``CacheReader`` for asyncio; the loader may be a coroutine function or a plain function."""

    def __init__(
        self, client: AsyncClient | str, prefix: str, *, ttl_s: float = 3600, cluster: ClusterMode = "auto"
    ) -> None:
        super().__init__(client, cluster=cluster)
        self._prefix, self.ttl_s = check_prefix(prefix), _checked_ttl_s(ttl_s)
        self._bind()

    def _bind(self) -> None:
        self._read, self._fill = self._client.register_script(READ_LUA), self._client.register_script(FILL_LUA)

    async def get_or_fill(
        self,
        org: int,
        key: str,
        loader: Callable[[], Awaitable[bytes | str] | bytes | str],
        *,
        ttl_s: float | None = None,
    ) -> bytes:
        """As ``CacheReader.get_or_fill``."""
        entry = Entry.of(self._prefix, org, key, self.ttl_s if ttl_s is None else ttl_s)
        client = await self._connected()
        with unavailable(self.url):
            epoch, stored = await self._read(keys=entry.slot_keys, args=[fresh_epoch()])
            served = _served(stored, epoch)
            if served is not None:
                return served
            await client.sadd(entry.registry, entry.org)
        loaded = loader()
        value = as_bytes(await loaded if inspect.isawaitable(loaded) else loaded)
        try:
            with unavailable(self.url):
                await self._fill(keys=entry.slot_keys, args=[epoch, value, entry.ttl_ms])
        except Unavailable as exc:
            log.warning("cache fill skipped: %s", exc)
        return value
