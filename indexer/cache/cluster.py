"""The primaries of a Redis Cluster, and one plain client per primary.

Some things only mean something on one node: ``WAIT`` counts the replicas that acknowledged the
writes of *one connection*, keyspace notifications, ``CONFIG`` and ``SCAN`` are per node.  So the
invalidator groups organizations by the primary that holds their slot and runs, per primary, its
scripts and then ``WAIT`` on one connection to it; the key tracker subscribes on every primary.

The slot map is redis-py's (``RedisCluster.nodes_manager``), read again by ``refresh`` whenever a
node says it changed (MOVED, ASK, CLUSTERDOWN, TRYAGAIN, READONLY, a lost connection).
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.backoff
import redis.exceptions

from indexer.cache.client import node_url
from indexer.cache.errors import unavailable

# redis-py's own bookkeeping in a node's connection settings, not ours to copy.
_NOT_COPIED = (
    "maint_notifications",
    "oss_cluster_maint",
    "orig_",
    "event_dispatcher",
    "cache",
    "response_callbacks",
)


class NodeMap:
    """Routes keys to their primary by the cluster client's slot map; a plain client per primary."""

    def __init__(self, cluster: redis.asyncio.cluster.RedisCluster, url: str) -> None:
        self.cluster = cluster
        self.url = url
        self._clients: dict[str, redis.asyncio.Redis] = {}
        self._lock = asyncio.Lock()

    async def ready(self) -> None:
        """The slot map is known (read at the first call)."""
        with unavailable(self.url):
            await self.cluster.initialize()

    async def refresh(self) -> None:
        """Read the slot map again (one ``CLUSTER SLOTS`` on a reachable node); clients of nodes that
        are no longer primaries are closed."""
        async with self._lock:
            with unavailable(self.url):
                await self.cluster.initialize()
                await self.cluster.nodes_manager.initialize()
            current = {node.name for node in self.primaries()}
            for name in [name for name in self._clients if name not in current]:
                await _close(self._clients.pop(name))

    def primaries(self) -> list[redis.asyncio.cluster.ClusterNode]:
        return sorted(self.cluster.get_primaries(), key=lambda node: node.name)

    def primary_of(self, key: str) -> redis.asyncio.cluster.ClusterNode:
        node = self.cluster.get_node_from_key(key)
        if node is None:  # pragma: no cover - redis-py raises SlotNotCoveredError first
            raise redis.exceptions.SlotNotCoveredError(f"no node holds the slot of {key!r}")
        return node

    def url_of(self, node: redis.asyncio.cluster.ClusterNode) -> str:
        return node_url(node.host, node.port)

    def client(self, node: redis.asyncio.cluster.ClusterNode) -> redis.asyncio.Redis:
        """A plain client of ``node`` with the cluster client's settings (timeouts, no retries,
        credentials, TLS); kept until the node is no longer a primary."""
        client = self._clients.get(node.name)
        if client is None:
            kwargs: dict[str, Any] = {
                name: value for name, value in node.connection_kwargs.items() if not name.startswith(_NOT_COPIED)
            }
            kwargs["retry"] = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)  # the caller's policy decides
            pool = redis.asyncio.ConnectionPool(connection_class=node.connection_class, **kwargs)
            client = self._clients[node.name] = redis.asyncio.Redis(connection_pool=pool)
        return client

    async def aclose(self) -> None:
        for client in self._clients.values():
            await _close(client)
        self._clients.clear()


async def _close(client: redis.asyncio.Redis) -> None:
    await client.aclose()
    await client.connection_pool.disconnect()
