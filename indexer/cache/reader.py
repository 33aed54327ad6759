"""The reader-side helper other services import to read and fill the caches.

It needs redis and nothing else of the indexer's dependencies: importing it imports neither
aio-pika nor psycopg.  Why a read through it never returns data older than an acknowledged
commit is told in the package doc.

``get_or_fill``'s policy is written once, for both readers, as a generator
(``_Reader._get_or_fill``): it makes each call (Redis, the loader), yields what the call returned
and goes on with what it is sent back.  ``CacheReader`` sends back what it was given, a result
already; ``AsyncCacheReader`` awaits it first and sends back its result, or throws in what the
await raised, at the very line of the call.  So the two cannot drift apart.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Generator
from typing import TYPE_CHECKING, Any, Self

from indexer.cache.client import AsyncClient, ClusterMode, OwnedAsyncClient, OwnedClient, SyncClient
from indexer.cache.errors import unavailable
from indexer.cache.keys import Entry, as_bytes, check_prefix, fresh_epoch, servable, ttl_ms
from indexer.cache.scripts import FILL_LUA, READ_LUA
from indexer.errors import Unavailable

if TYPE_CHECKING:
    from indexer.config import Settings

log = logging.getLogger(__name__)

# What ``_get_or_fill`` yields (a call's result, or its awaitable) and returns (the value).
_Steps = Generator[Any, Any, bytes]


def _served(stored: bytes | None, epoch: bytes) -> bytes | None:
    """What a read returns of a stored value, None for a miss: a value filled under an epoch that is
    not the current one (it came back after its invalidation, e.g. restored by a failover) is
    never served; the loader runs and a fresh fill overwrites it."""
    return None if stored is None else servable(as_bytes(stored), as_bytes(epoch))


def _checked_ttl_s(ttl_s: float) -> float:
    ttl_ms(ttl_s)  # raises for a bad one
    return ttl_s


class _Reader:
    """What both readers share: the prefix, the default TTL, the scripts and ``get_or_fill``'s steps.

    First in each reader's bases, so that its ``_bind`` is the one the client calls again after a
    switch to a cluster client."""

    if TYPE_CHECKING:  # the client class beside it in each reader's bases gives these
        url: str
        _client: Any

        def __init__(self, client: Any, prefix: str, *, ttl_s: float = 3600, cluster: ClusterMode = "auto") -> None: ...

        def _connected(self) -> Any: ...

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """A reader of the indexer's prefix and TTL, from the same settings the indexer reads."""
        return cls(
            settings.redis_url, settings.cache_prefix, ttl_s=settings.cache_ttl_s, cluster=settings.redis_cluster
        )

    def _configure(self, prefix: str, ttl_s: float) -> None:
        self._prefix, self.ttl_s = check_prefix(prefix), _checked_ttl_s(ttl_s)
        self._bind()

    def _bind(self) -> None:
        self._read, self._fill = self._client.register_script(READ_LUA), self._client.register_script(FILL_LUA)

    def _get_or_fill(self, org: int, key: str, loader: Callable[[], Any], ttl_s: float | None) -> _Steps:
        """``get_or_fill``, one ``yield`` per call (see the module doc)."""
        entry = Entry.of(self._prefix, org, key, self.ttl_s if ttl_s is None else ttl_s)
        client = yield self._connected()
        with unavailable(self.url):
            epoch, stored = yield self._read(keys=entry.slot_keys, args=[fresh_epoch()])
            served = _served(stored, epoch)
            if served is not None:
                return served
            # Registered before the fill, so invalidate_all finds every org that has keys.
            yield client.sadd(entry.registry, entry.org)
        value = as_bytes((yield loader()))
        try:
            with unavailable(self.url):
                yield self._fill(keys=entry.slot_keys, args=[epoch, value, entry.ttl_ms])
        except Unavailable as exc:
            log.warning("cache fill skipped: %s", exc)
        return value


def _run(steps: _Steps) -> bytes:
    """Runs the steps of a synchronous reader: each call has returned already, its result goes back."""
    try:
        result = next(steps)
        while True:
            result = steps.send(result)
    except StopIteration as done:
        value: bytes = done.value
        return value


async def _run_async(steps: _Steps) -> bytes:
    """Runs the steps of an asyncio reader: what a call returns is awaited (a loader's result only if
    awaitable), and its result sent back or what it raised thrown in, where the call was made."""
    result: Any = None
    error: BaseException | None = None
    while True:
        try:
            pending = steps.send(result) if error is None else steps.throw(error)
        except StopIteration as done:
            value: bytes = done.value
            return value
        try:
            result, error = (await pending if inspect.isawaitable(pending) else pending), None
        except BaseException as exc:  # a cancellation too: the steps see it, as they would inline
            result, error = None, exc


class CacheReader(_Reader, OwnedClient):
    """Reads and fills a prefix's caches for services that read the read model (synchronous).

    Constructed from a URL it owns its client (``close`` closes it); a client passed in stays the
    caller's.  The URL may name a single server or any node of a Redis Cluster, primary or replica
    (``cluster``: ``auto`` asks the node at the first call); a client may be a ``redis.Redis`` or
    a ``redis.cluster.RedisCluster``.
    """

    def __init__(
        self, client: SyncClient | str, prefix: str, *, ttl_s: float = 3600, cluster: ClusterMode = "auto"
    ) -> None:
        # Named, not super(): a type checker would take the __init__ _Reader declares for it.
        OwnedClient.__init__(self, client, cluster=cluster)
        self._configure(prefix, ttl_s)

    def get_or_fill(
        self, org: int, key: str, loader: Callable[[], bytes | str], *, ttl_s: float | None = None
    ) -> bytes:
        """The cached value of ``P:{org}:key``; on a miss ``loader()`` (reading the database) gives
        it and it is stored, unless an invalidation ran meanwhile.  Raises ``Unavailable`` if Redis
        cannot be read; a failure to store after loading only logs (the value is still correct)."""
        return _run(self._get_or_fill(org, key, loader, ttl_s))


class AsyncCacheReader(_Reader, OwnedAsyncClient):
    """``CacheReader`` for asyncio; the loader may be a coroutine function or a plain function."""

    def __init__(
        self, client: AsyncClient | str, prefix: str, *, ttl_s: float = 3600, cluster: ClusterMode = "auto"
    ) -> None:
        OwnedAsyncClient.__init__(self, client, cluster=cluster)  # named: see CacheReader
        self._configure(prefix, ttl_s)

    async def get_or_fill(
        self,
        org: int,
        key: str,
        loader: Callable[[], Awaitable[bytes | str] | bytes | str],
        *,
        ttl_s: float | None = None,
    ) -> bytes:
        """As ``CacheReader.get_or_fill``."""
        return await _run_async(self._get_or_fill(org, key, loader, ttl_s))
