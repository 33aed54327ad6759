"""Redis clients as the cache modules want them: bounded timeouts and no retries inside, a single
server or a Redis Cluster.

No retries inside redis-py: the caller's policy decides, and a hidden retry would stretch every
outage report and delay the not-ready that tells an operator.  (A cluster client still follows a
MOVED or ASK redirection: that is routing, not a retry.)

A URL may name one server or any node of a Redis Cluster, primary or replica (``cluster``:
``auto`` asks the node, ``INFO cluster``, at the first call that needs Redis; ``on`` / ``off``
force it).  A client passed in is used as it is: ``redis.Redis`` or ``redis.cluster.RedisCluster``
(their asyncio versions for asyncio).
"""

from __future__ import annotations

from typing import Any, Literal, Self, TypeAlias

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.backoff
import redis.cluster
import redis.exceptions
import redis.retry

from indexer.cache.errors import unavailable

TIMEOUT_S = 5.0
_HEALTH_CHECK_INTERVAL_S = 30

# INDEXER_REDIS_CLUSTER: whether REDIS_URL names a node of a Redis Cluster (auto: ask it).
ClusterMode = Literal["auto", "on", "off"]

SyncClient: TypeAlias = "redis.Redis | redis.cluster.RedisCluster"
AsyncClient: TypeAlias = "redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster"


def _options() -> dict[str, Any]:
    return {
        "socket_connect_timeout": TIMEOUT_S,
        "socket_timeout": TIMEOUT_S,
        "health_check_interval": _HEALTH_CHECK_INTERVAL_S,
    }


def _check_mode(cluster: str) -> ClusterMode:
    if cluster not in ("auto", "on", "off"):
        raise ValueError(f"cluster must be auto, on or off, got {cluster!r}")
    return cluster  # type: ignore[return-value]


def node_url(host: str, port: int | str) -> str:
    return f"redis://{host}:{port}/0"


def describe(client: Any) -> str:
    """A URL for error messages, built from a client's settings; it carries no password."""
    if isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster):
        node = client.get_default_node()
        return "cluster " + (node_url(node.host, node.port) if node is not None else "(no node known)")
    kwargs = client.connection_pool.connection_kwargs
    if "path" in kwargs:
        return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
    return f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def is_cluster(client: object) -> bool:
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def _cluster_enabled(info: dict[str, Any]) -> bool:
    return str(info.get("cluster_enabled", "0")) == "1"


def _refused(exc: redis.exceptions.ResponseError) -> bool:
    """INFO refused (an ACL, a managed Redis): not a cluster node as far as we can tell."""
    return isinstance(exc, redis.exceptions.NoPermissionError) or "unknown" in str(exc).lower()


def plain_sync(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **_options())


def cluster_sync(url: str) -> redis.cluster.RedisCluster:
    """A cluster client from one node's URL (a replica works: it knows the slot map too)."""
    return redis.cluster.RedisCluster.from_url(url, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0), **_options())


def plain_async(url: str) -> redis.asyncio.Redis:
    retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
    return redis.asyncio.Redis.from_url(url, retry=retry, **_options())


def cluster_async(url: str) -> redis.asyncio.cluster.RedisCluster:
    retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
    return redis.asyncio.cluster.RedisCluster.from_url(url, retry=retry, **_options())


class OwnedClient:
    """A synchronous client, closed by ``close`` only when it was built here from a URL.

    Built from a URL with ``cluster="auto"`` it starts as a plain client and becomes a cluster
    client at the first ``_connected()`` if the node says ``cluster_enabled:1``; subclasses bind
    their scripts in ``_bind`` (called again then)."""

    def __init__(self, client: SyncClient | str, *, cluster: ClusterMode = "auto") -> None:
        mode = _check_mode(cluster)
        self._detect = False
        self._client: SyncClient
        if isinstance(client, str):
            self.url, self._owned = client, True
            self._client = cluster_sync(client) if mode == "on" else plain_sync(client)
            self._detect = mode == "auto"
        else:
            self._client, self.url, self._owned = client, describe(client), False

    def _bind(self) -> None:
        """(Re)bind what depends on the client; called at construction and after a switch to cluster."""

    def _connected(self) -> SyncClient:
        if self._detect:
            assert isinstance(self._client, redis.Redis)
            try:
                with unavailable(self.url):
                    enabled = _cluster_enabled(self._client.info("cluster"))
            except redis.exceptions.ResponseError as exc:
                if not _refused(exc):
                    raise
                enabled = False
            self._detect = False
            if enabled:
                old, self._client = self._client, cluster_sync(self.url)
                old.close()
                self._bind()
        return self._client

    @property
    def cluster(self) -> bool | None:
        """Whether the client is a cluster client; None while not yet asked (auto)."""
        return None if self._detect else is_cluster(self._client)

    def close(self) -> None:
        if self._owned:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class OwnedAsyncClient:
    """``OwnedClient`` for asyncio: ``aclose`` and ``async with``."""

    def __init__(self, client: AsyncClient | str, *, cluster: ClusterMode = "auto") -> None:
        mode = _check_mode(cluster)
        self._detect = False
        self._client: AsyncClient
        if isinstance(client, str):
            self.url, self._owned = client, True
            self._client = cluster_async(client) if mode == "on" else plain_async(client)
            self._detect = mode == "auto"
        else:
            self._client, self.url, self._owned = client, describe(client), False

    def _bind(self) -> None:
        """As ``OwnedClient._bind``."""

    async def _connected(self) -> AsyncClient:
        if self._detect:
            plain = self._client
            assert isinstance(plain, redis.asyncio.Redis)
            try:
                with unavailable(self.url):
                    enabled = _cluster_enabled(await plain.info("cluster"))
            except redis.exceptions.ResponseError as exc:
                if not _refused(exc):
                    raise
                enabled = False
            if self._detect:  # not switched by a concurrent call meanwhile
                self._detect = False
                if enabled:
                    self._client = cluster_async(self.url)
                    await plain.aclose()
                    self._bind()
        return self._client

    @property
    def cluster(self) -> bool | None:
        """Whether the client is a cluster client; None while not yet asked (auto)."""
        return None if self._detect else is_cluster(self._client)

    async def aclose(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
